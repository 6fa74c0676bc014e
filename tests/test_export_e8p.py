"""The 2- and 4-bit E8P programs: linears on QuIP#'s codes through our operator, checked against the dense arithmetic."""

import dataclasses

import pytest
import torch
from torch import nn

from export.e8p_linear import E8PLinears
from export.options import ExportOptions
from export.to_pte import run
from spinquant.errors import UserError
from spinquant.eval import main as eval_main
from spinquant.gptq import GPTQResult
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quip import quip_e8p


def linear_on_codes(out_features: int, in_features: int, seed: int, bias: bool, bits: int = 2) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    linear.e8p = quip_e8p(linear.weight.data, bits=bits)
    return linear


@pytest.mark.parametrize("bias,bits", [(False, 2), (True, 2), (False, 4)])
def test_linears_of_one_input_on_codes_compute_their_dequantized_weights(bias, bits):
    """q, k, v sizes of the demo (576 in; 576, 192, 192 out) against x·Wᵀ + b with W decoded in float64."""
    linears = [linear_on_codes(out, 576, seed, bias, bits) for seed, out in enumerate((576, 192, 192))]
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(9))
    ours = E8PLinears(linears)(x).double()
    reference = torch.cat([x.double() @ lin.e8p.dequantize().T + (lin.bias.double() if bias else 0) for lin in linears], -1)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_e8p2_program_matches_the_eager_model_and_takes_blockldlqs_codes(tiny_hf_dir, tmp_path):
    text = str(tiny_hf_dir.parent / "text.txt")
    eval_main(["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir / "tokenizer.json"), "--seqlen", "64", "--quant", "w4a16",
               "--w-codebook", "e8p", "--w-gptq", "--calib-text", text, "--gptq-windows", "4", "--gptq-output", str(tmp_path / "e8p.pt")])
    for gptq_file in ("", str(tmp_path / "e8p.pt")):
        opts = ExportOptions(model=str(tiny_hf_dir), rotation="none", qlinear="e8p2", lm_head="8da8w", gptq_file=gptq_file,
                             max_seq_len=32, output_dir=tmp_path / "pte").check()
        report = run(opts)  # its check runs the program against the eager model
        assert report["verify"]["mean_kl"] < 1e-6 and report["options"]["qlinear"] == "e8p2"
    saved = GPTQResult.load(tmp_path / "e8p.pt")
    eager = prepare(load_model(str(tiny_hf_dir)).model, "none", opts.program_quant(), saved)
    for name, qw in saved.weights.items():
        assert torch.equal(eager.get_submodule(name).e8p.codes, qw.codes)


def test_e8p4_program_matches_the_eager_model_on_blockldlqs_residual_codes(tiny_hf_dir, tmp_path):
    text = str(tiny_hf_dir.parent / "text.txt")
    base = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir / "tokenizer.json"), "--seqlen", "64", "--quant", "w4a16",
            "--w-codebook", "e8p", "--w-gptq", "--calib-text", text, "--gptq-windows", "4"]
    for bits in (3, 4):
        eval_main(base + ["--w-bits", str(bits), "--gptq-output", str(tmp_path / f"e8p{bits}.pt")])
    opts = ExportOptions(model=str(tiny_hf_dir), rotation="none", qlinear="e8p4", lm_head="8da8w", gptq_file=str(tmp_path / "e8p4.pt"),
                         max_seq_len=32, output_dir=tmp_path / "pte").check()
    report = run(opts)
    assert report["verify"]["mean_kl"] < 1e-6 and report["options"]["qlinear"] == "e8p4"
    for qlinear, bits in (("e8p4", 3), ("e8p2", 4)):
        wrong = ExportOptions(model=str(tiny_hf_dir), rotation="none", qlinear=qlinear, lm_head="8da8w",
                              gptq_file=str(tmp_path / f"e8p{bits}.pt"), max_seq_len=32, output_dir=tmp_path / "wrong").check()
        with pytest.raises(UserError, match=f"holds {bits}-bit e8p weights; this quantization needs {qlinear[-1]}-bit"):
            run(wrong)
    stripped = GPTQResult.load(tmp_path / "e8p4.pt")
    stripped.weights = {name: dataclasses.replace(qw, residual=None) for name, qw in stripped.weights.items()}
    stripped.save(tmp_path / "stripped.pt")
    with pytest.raises(UserError, match="holds 4-bit E8P codes for .* without residual codes"):
        run(dataclasses.replace(opts, gptq_file=str(tmp_path / "stripped.pt"), output_dir=tmp_path / "stripped"))


def test_e8p2_takes_no_int4_gptq(tiny_hf_dir, tmp_path):
    with pytest.raises(UserError, match="--gptq runs int4 GPTQ; for BlockLDLQ's E8P codes"):
        ExportOptions(qlinear="e8p2", gptq=True).check()
