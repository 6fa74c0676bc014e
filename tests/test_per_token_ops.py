import torch
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerGroup, quantize_

from export.per_token_ops import PER_TOKEN, PerTokenInt8Linear, per_token_linear
from export.program import export_program
from spinquant.torchao_quant import ProgramQuant, quantize_for_export
from spinquant.models import load_model
from spinquant.rotation import OnlineHadamardLinear

TORCHAO = torch.ops.torchao


def quantized_linear(config) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    quantize_(linear, config)
    return linear


def test_same_output_as_torchaos_own_linear():
    linear = quantized_linear(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    x = torch.randn(1, 7, 64) * torch.logspace(-2, 2, 64)  # outlier channels: the activation scales matter
    ours = per_token_linear(linear)
    assert isinstance(ours, PerTokenInt8Linear)
    torch.testing.assert_close(ours(x), linear(x), rtol=1e-5, atol=1e-5 * linear(x).abs().max().item())


def test_other_linears_are_left_as_they_are():
    float_linear = torch.nn.Linear(64, 32, bias=False)
    weight_only = quantized_linear(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    assert per_token_linear(float_linear) is float_linear
    assert per_token_linear(weight_only) is weight_only


def test_the_online_hadamard_wrapper_gets_a_new_one_and_the_models_stays():
    linear = quantized_linear(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    model_module = OnlineHadamardLinear(linear)
    ours = per_token_linear(model_module)
    assert isinstance(ours.linear, PerTokenInt8Linear) and model_module.linear is linear
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), model_module(x), rtol=1e-5, atol=1e-5 * model_module(x).abs().max().item())


def test_exported_program_has_per_token_ops_before_every_linear_and_no_torchao_activation_ops(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir)).model.requires_grad_(False)
    quantize_for_export(model, ProgramQuant())
    targets = [n.target for n in export_program(model, 32, 16).graph.nodes if n.op == "call_function"]
    linears = targets.count(torch.ops.aten.linear.default)  # q/k/v and gate/up run fused
    for op in (PER_TOKEN.choose_qparams_per_token_asymmetric, PER_TOKEN.quantize_per_token, PER_TOKEN.dequantize_per_token):
        assert targets.count(op.default) == linears
    assert TORCHAO.choose_qparams_affine.default not in targets and TORCHAO.quantize_affine.default not in targets
    assert isinstance(model.lm_head, torch.nn.Linear)  # the model itself is untouched
