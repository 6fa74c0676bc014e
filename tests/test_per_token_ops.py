import pytest
import torch
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

from export.per_token_ops import PER_TOKEN, TORCHAO, respell_per_token_quant
from export.program import export_program
from spinquant.models import load_model
from export.quantize import quantize_for_export


def targets(program: torch.export.ExportedProgram) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


class FakeQuant(torch.nn.Module):
    """torchao's choose → quantize → dequantize chain with a given mapping and block."""

    def __init__(self, mapping: str, block: list[int]):
        super().__init__()
        self.mapping, self.block = mapping, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = TORCHAO.choose_qparams_affine(x, self.mapping, self.block, torch.int8, -128, 127, None, None, torch.int8)
        q = TORCHAO.quantize_affine(x, self.block, scale, zero, torch.int8, -128, 127)
        return TORCHAO.dequantize_affine(q, self.block, scale, zero, torch.int8, -128, 127)


def export_dynamic(model: torch.nn.Module) -> torch.export.ExportedProgram:
    seq = torch.export.Dim("seq", min=1, max=15)
    return torch.export.export(model, (torch.randn(1, 4, 64),), dynamic_shapes=({1: seq},), strict=False)


@pytest.fixture(scope="module")
def tiny_program(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir)).model.requires_grad_(False)
    quantize_for_export(model, "8da4w", "8da8w", "8w", 32)
    return model, export_program(model, 32)


def test_every_linear_input_is_respelled_and_the_program_computes_the_same(tiny_program):
    _, program = tiny_program
    ids, pos = torch.tensor([[5, 17, 33, 2]]), torch.arange(4)
    before = program.module()(ids, pos)
    n_linears = targets(program).count(torch.ops.aten.linear.default)  # q/k/v and gate/up run fused

    assert respell_per_token_quant(program) == targets(program).count(PER_TOKEN.choose_qparams_per_token_asymmetric.default)
    after = program.module()(ids, pos)

    assert targets(program).count(PER_TOKEN.quantize_per_token.default) == n_linears
    assert targets(program).count(PER_TOKEN.dequantize_per_token.default) == n_linears
    assert TORCHAO.choose_qparams_affine.default not in targets(program)
    assert TORCHAO.quantize_affine.default not in targets(program)
    # Same integers: asymmetric int8 per token is one formula in both libraries, up to float rounding of the scale.
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("mapping, block", [("SYMMETRIC", [1, 1, 64]), ("ASYMMETRIC", [1, 1, 32])])
def test_other_activation_schemes_are_left_alone(mapping, block):
    program = export_dynamic(FakeQuant(mapping, block))
    graph_before = targets(program)
    assert respell_per_token_quant(program) == 0
    assert targets(program) == graph_before


def test_a_single_linear_is_respelled_and_its_output_kept():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    program = export_dynamic(model)
    x = torch.randn(1, 7, 64)
    before = program.module()(x)
    assert respell_per_token_quant(program) == 1
    torch.testing.assert_close(program.module()(x), before, rtol=1e-5, atol=1e-5)
