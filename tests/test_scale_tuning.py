import copy

import pytest
import torch
import torch.nn.functional as F

from spinquant.errors import UserError
from spinquant.eval import main as eval_main
from spinquant.gptq import GPTQConfig, GPTQResult, rtn_model
from spinquant.models import load_model, tiny_llama, tiny_llama_config
from spinquant.pipeline import prepare
from spinquant.quant import quantize_activations, quantize_model, setting
from spinquant.rotation import apply_rotations, rotations_for
from spinquant.scale_tuning import dequantized, distribution_loss, tune_scales
from spinquant.torchao_quant import ProgramQuant


def rounded_model(dtype: torch.dtype = torch.float32):
    """A rotated tiny Llama, its full-precision copy, and its decoder linears rounded to nearest in GPTQ's layout."""
    model = tiny_llama(tiny_llama_config(hidden=64, intermediate=128, heads=4, kv_heads=2), dtype=dtype)
    model = apply_rotations(model, rotations_for("hadamard", model.config))
    teacher = copy.deepcopy(model)
    return model, teacher, rtn_model(model, GPTQConfig(method="rtn", clip_search=False))


def windows(n: int = 8, seqlen: int = 48) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def kl_in_place(model, teacher, ids: torch.Tensor) -> float:
    """The reference: KL(teacher ‖ model) with the weights in the model, by the textbook sum, in float64."""
    p = F.log_softmax(teacher(ids).logits.double(), -1)
    q = F.log_softmax(model(ids).logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_loss_with_substituted_weights_is_the_kl_of_the_model_holding_them():
    model, teacher, weights = rounded_model(torch.float64)
    ids = windows(2)
    scaled = {name: qw.scale.double() * 1.1 for name, qw in weights.items()}
    substituted = {f"{n}.weight": dequantized(weights[n].qdata.double(), s) for n, s in scaled.items()}
    loss = distribution_loss(model, teacher, substituted, ids).item()
    for name, weight in substituted.items():
        model.get_submodule(name.removesuffix(".weight")).weight.data = weight
    assert loss == pytest.approx(kl_in_place(model, teacher, ids), rel=1e-10, abs=1e-14)


def test_tuning_brings_the_distribution_back_and_keeps_the_integers():
    model, teacher, weights = rounded_model()
    ids = windows()
    before = kl_in_place(model, teacher, ids)
    tuned = tune_scales(model, teacher, weights, ids, steps=40, lr=1e-2, progress=False)
    assert kl_in_place(model, teacher, ids) < 0.8 * before
    assert tuned.keys() == weights.keys()
    for name, qw in tuned.items():
        assert torch.equal(qw.qdata, weights[name].qdata) and qw.scale.dtype == weights[name].scale.dtype
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())  # the model holds what the result says
    assert any(not torch.equal(qw.scale, weights[name].scale) for name, qw in tuned.items())
    assert all(p.requires_grad for p in model.parameters())  # frozen while tuning only


def test_eval_tunes_gptqs_scales_and_saves_them(tiny_hf_dir, calib_text, tmp_path):
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--quant", "w4a8",
            "--w-gptq", "--calib-text", str(calib_text), "--gptq-windows", "4"]
    plain = eval_main(args + ["--gptq-output", str(tmp_path / "plain.pt")])
    tuned = eval_main(args + ["--gptq-tune-steps", "10", "--gptq-tune-lr", "1e-2", "--gptq-output", str(tmp_path / "tuned.pt")])
    assert tuned["gptq"]["config"]["tune_steps"] == 10 and plain["gptq"]["config"]["tune_steps"] == 0
    assert tuned["perplexity"] != plain["perplexity"]
    plain_w, tuned_w = GPTQResult.load(tmp_path / "plain.pt").weights, GPTQResult.load(tmp_path / "tuned.pt").weights
    assert all(torch.equal(plain_w[n].qdata, tuned_w[n].qdata) for n in plain_w)


@pytest.mark.parametrize("flags", [["--gptq-tune-steps", "-1"], ["--gptq-tune-lr", "0"]])
def test_eval_refuses_bad_tuning_flags(tiny_hf_dir, flags):
    with pytest.raises(UserError, match="--gptq-tune-steps must be 0 or more"):
        eval_main(["--model", str(tiny_hf_dir), "--quant", "w4a8", "--w-gptq", *flags])


def hooked(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_straight_through_inputs_are_quantized_forward_and_pass_the_gradient_unchanged():
    model, _, _ = rounded_model()
    handles = quantize_activations(model, setting("w4a4kv4"), ste=True)
    linear = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = linear(x)
    assert not torch.allclose(y, x @ linear.weight.T, atol=1e-3)  # the int4 input went in
    y.sum().backward()
    # d(input)/dx taken as 1 but at each token's extremes, which move its scale and zero point too
    same = (x.grad - linear.weight.sum(0)).abs() < 1e-5
    assert same.sum(-1).min() >= 62
    for handle in handles:
        handle.remove()
    assert hooked(model) == 0


def test_tuning_through_quantized_activations_lowers_that_models_kl():
    """The KL it lowers is the one of the model with those activations; its hooks go when it ends."""
    qc = setting("w4a4kv4")
    model, teacher, weights = rounded_model()
    ids = windows()
    quantized = copy.deepcopy(model)
    quantize_model(quantized, qc, weights_done=list(quantized.model.layers.modules()))
    before = kl_in_place(quantized, teacher, ids)
    tune_scales(model, teacher, weights, ids, steps=40, lr=1e-2, progress=False, activations=qc)
    assert hooked(model) == 0  # quantize_model puts the setting's own on
    quantize_model(model, qc, weights_done=list(model.model.layers.modules()))
    assert kl_in_place(model, teacher, ids) < 0.9 * before


def test_tuning_through_activations_is_for_fake_quantization_only(tiny_hf_dir):
    with pytest.raises(UserError, match="give --gptq-tune-steps N too"):
        eval_main(["--model", str(tiny_hf_dir), "--quant", "w4a4kv4", "--w-gptq", "--gptq-tune-activations"])
    model = load_model(str(tiny_hf_dir)).model
    with pytest.raises(UserError, match="for fake quantization .spinquant.eval.; the program's are int8"):
        prepare(model, "r4", ProgramQuant(), GPTQConfig(tune_steps=2, tune_activations=True))
