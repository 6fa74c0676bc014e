import copy
import dataclasses
import json
import math

import pytest
import torch
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

from spinquant.torchao_quant import linear_config
from spinquant.errors import UserError
from spinquant.data import text_sha256
from spinquant.eval import gptq_config_from_args, parse_args
from spinquant.eval import main as eval_main
from spinquant.eval import quantized_model
from gptq_reference import whole_model_gptq
from spinquant.gptq import GPTQConfig, GPTQResult, first_layer_inputs, gptq_model, gptq_quantize, round_to_nearest, rtn_model, run_layer
from spinquant.cholesky import upper_cholesky_of_inverse
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.quant import fake_quantize, setting
from spinquant.rotation import apply_rotations, rotations_for


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """H = 2XᵀX/n of inputs with correlated channels and one outlier channel, as real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix
    x[:, 3] *= 20
    return 2 * x.T @ x / tokens


def random_weight(out: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the squared error of x·Wᵀ over the inputs behind H."""
    d = (w - w_hat.to(w.dtype)).to(h.dtype)
    return ((d @ h) * d).sum().item()


def reference_gptq(w: torch.Tensor, h: torch.Tensor, group: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal-brain-surgeon recursion of the paper, column by column in float64, with an explicit inverse.

    Scales as torchao (symmetric, max|w|/7.5, fp32) from each group's current weights when it starts.
    """
    w = w.clone()
    n = w.shape[1]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    q = torch.zeros_like(w)
    scales = []
    for j in range(n):
        if j % group == 0:
            s = (w[:, j : j + group].float().abs().amax(1) / 7.5).clamp(min=torch.finfo(torch.float32).smallest_normal)
            scales.append(s)
        q[:, j] = torch.clamp(torch.round(w[:, j] * (1.0 / s)), -8, 7)
        e = (w[:, j] - q[:, j] * s.double()) / hinv[j, j]
        w[:, j + 1 :] -= e[:, None] * hinv[j, j + 1 :][None]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]  # drop column j from the problem
    return q, torch.stack(scales, 1)


def test_gptq_equals_the_column_by_column_reference():
    h, w = correlated_hessian(96), random_weight(24, 96)
    ours = gptq_quantize(w, h, GPTQConfig(group=32, block=64, scale_dtype="fp32", act_order=False, clip_search=False))
    q, scales = reference_gptq(w, h, 32)
    assert torch.equal(ours.scale, scales)
    assert torch.equal(ours.qdata.double(), q)


def test_gptq_output_error_is_below_round_to_nearest():
    h, w = correlated_hessian(128), random_weight(32, 128)
    rtn = fake_quantize(w.float(), 4, 32, symmetric=True)
    for cfg in (GPTQConfig(), GPTQConfig(act_order=False, clip_search=False), GPTQConfig(act_order=False), GPTQConfig(clip_search=False)):
        gptq = gptq_quantize(w, h, cfg).dequantize()
        assert output_error(w, gptq, h) < 0.7 * output_error(w, rtn, h), cfg


@pytest.mark.parametrize("scale_dtype", ["bf16", "fp32"])
def test_identity_hessian_gives_torchao_8da4w_integers_and_scales(scale_dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48, bias=False)
    linear.weight.data[:, 7] *= 30  # groups of very different ranges
    reference = copy.deepcopy(linear)
    config = linear_config("8da4w", 32) if scale_dtype == "bf16" else Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    quantize_(reference, config)
    plain = GPTQConfig(group=32, scale_dtype=scale_dtype, act_order=False, clip_search=False)
    for ours in (gptq_quantize(linear.weight.data, torch.eye(256), plain), round_to_nearest(linear.weight.data, dataclasses.replace(plain, method="rtn"))):
        assert ours.scale.dtype == reference.weight.scale.dtype
        assert torch.equal(ours.qdata, reference.weight.qdata)
        assert torch.equal(ours.scale, reference.weight.scale)
        assert torch.equal(ours.dequantize(), reference.weight.dequantize())


def test_act_order_keeps_the_static_round_to_nearest_scales():
    h, w = correlated_hessian(64), random_weight(16, 64)
    ours = gptq_quantize(w, h, GPTQConfig(act_order=True, clip_search=False, scale_dtype="fp32"))
    rtn_scale = (w.float().unflatten(1, (2, 32)).abs().amax(-1) / 7.5)
    assert torch.equal(ours.scale, rtn_scale)
    assert ours.qdata.min() >= -8 and ours.qdata.max() <= 7


def test_dead_input_channel_and_rank_deficient_hessian_are_handled():
    h, w = correlated_hessian(64), random_weight(16, 64)
    h[5, :], h[:, 5] = 0, 0  # an input that is always zero
    ours = gptq_quantize(w, h, GPTQConfig())
    assert torch.equal(ours.qdata[:, 5], torch.zeros(16, dtype=torch.int8))
    assert torch.isfinite(ours.dequantize()).all()
    x = torch.randn(8, 64, dtype=torch.float64)  # 8 tokens for 64 inputs: singular, and no damping at all
    low_rank = gptq_quantize(w, 2 * x.T @ x / 8, GPTQConfig(damp=0.0))
    assert torch.isfinite(low_rank.dequantize()).all()


def test_hopeless_hessian_is_a_clear_error():
    with pytest.raises(UserError, match="the Hessian stays singular"):
        upper_cholesky_of_inverse(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01)


def tiny_rotated_model(rotation: str = "hadamard"):
    model = tiny_llama(tiny_llama_config(hidden=64, intermediate=128, heads=4, kv_heads=2), dtype=torch.float32)
    return apply_rotations(model, rotations_for(rotation, model.config))


def test_model_gptq_quantizes_every_decoder_linear_in_place():
    model = tiny_rotated_model()
    windows = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    result = gptq_model(model, windows, GPTQConfig(group=32), torch.device("cpu"), progress=False)
    assert len(result) == 2 * 7 and "model.layers.1.mlp.down_proj.linear" in result  # R4: the inner linear
    for name, qw in result.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
        assert qw.qdata.dtype == torch.int8 and qw.scale.dtype == torch.bfloat16


def test_too_few_calibration_tokens_is_a_clear_error():
    model = tiny_rotated_model()
    with pytest.raises(UserError, match="too few calibration tokens: 64, fewer than the 128 inputs"):
        gptq_model(model, torch.zeros(2, 32, dtype=torch.long), GPTQConfig(), torch.device("cpu"), progress=False)


def test_eval_with_gptq_records_the_calibration_and_saves_integers(tiny_hf_dir, calib_text, tmp_path):
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--quant", "w4a8"]
    rtn = eval_main(args)
    gptq = eval_main(args + ["--w-gptq", "--calib-text", str(calib_text), "--gptq-windows", "4", "--gptq-output", str(tmp_path / "g.pt")])
    assert gptq["perplexity"] != rtn["perplexity"] and math.isfinite(gptq["perplexity"])
    assert gptq["gptq"]["windows"] == 4 and gptq["gptq"]["calibration_sha256"] != gptq["text_sha256"]
    saved = GPTQResult.load(tmp_path / "g.pt")
    assert saved.calibration_sha256 == gptq["gptq"]["calibration_sha256"] and len(saved.weights) == 14


def test_eval_with_gptq_on_the_export_setting_keeps_its_8bit_lm_head_and_embedding(tiny_hf_dir, calib_text):
    """`--quant w4a8-export --w-gptq` is what `export.to_pte --gptq` builds: GPTQ decoder, RTN 8-bit lm_head and embedding."""
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--w-gptq",
            "--calib-text", str(calib_text), "--gptq-windows", "4"]
    export_setting, decoder_only = eval_main(args + ["--quant", "w4a8-export"]), eval_main(args + ["--quant", "w4a8"])
    assert export_setting["quant"]["lm_head_bits"] == 8 and export_setting["gptq"]["windows"] == 4
    assert math.isfinite(export_setting["perplexity"]) and export_setting["perplexity"] != decoder_only["perplexity"]


def test_eval_with_gptq_and_a_4bit_lm_head_quantizes_the_lm_head_by_gptq(tiny_hf_dir, calib_text, tmp_path):
    """`--quantize-lm-head --w-gptq` is the default export's setting: GPTQ's lm_head, kept by the fake quantization."""
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--quant", "w4a8",
            "--w-gptq", "--calib-text", str(calib_text), "--gptq-windows", "4"]
    with_head = eval_main(args + ["--quantize-lm-head", "--gptq-output", str(tmp_path / "g.pt")])
    saved = GPTQResult.load(tmp_path / "g.pt")
    assert len(saved.weights) == 15 and saved.weights["lm_head"].qdata.abs().max() <= 8
    model = quantized_model(str(tiny_hf_dir), "none", setting("w4a8", lm_head_bits=4, lm_head_group=32), gptq=saved).model
    assert torch.equal(model.lm_head.weight, saved.weights["lm_head"].dequantize())  # not rounded again
    assert math.isfinite(with_head["perplexity"])


def test_eval_refuses_the_calibration_text(tiny_hf_dir, tmp_path):
    text = tiny_hf_dir.parent / "text.txt"
    args = ["--model", str(tiny_hf_dir), "--text", str(text), "--seqlen", "64", "--quant", "w4a8"]
    with pytest.raises(UserError, match="is the calibration text of the GPTQ"):
        eval_main(args + ["--w-gptq", "--calib-text", str(text)])
    rotation = tmp_path / "r.pt"
    rotation.write_bytes(b"")  # refused before it is read
    rotation.with_suffix(".json").write_text(json.dumps({"calibration_sha256": text_sha256(text.read_text())}))
    with pytest.raises(UserError, match="is the calibration text of the rotation"):
        eval_main(args + ["--rotation", str(rotation)])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--quant", "fp"], "--w-gptq needs quantized weights"), (["--w-asym"], "drop --w-asym"),
        (["--w-clip-search"], "--w-clip-search is round-to-nearest's"),
        (["--w-clip", "0.8"], "--w-clip is round-to-nearest's"),
    ],
)
def test_eval_refuses_what_gptq_cannot_do(tiny_hf_dir, extra, message):
    with pytest.raises(UserError, match=message):
        eval_main(["--model", str(tiny_hf_dir), "--quant", "w4a8", "--w-gptq", *extra])


def test_layer_by_layer_forward_is_the_model_forward():
    model = tiny_rotated_model()
    windows = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = first_layer_inputs(model, windows, torch.device("cpu"))
    with torch.no_grad():
        for layer in model.model.layers:
            inputs = run_layer(layer, inputs, kwargs, torch.device("cpu"))
        expected = model.model(windows, use_cache=False).last_hidden_state
    assert torch.allclose(model.model.norm(torch.cat(inputs)), expected, atol=1e-5)


def test_default_gptq_is_gptaq_with_mse_clip_and_int8_inputs():
    """The default that beat round to nearest for every rotation of the demo model (results/gptq_smollm2.md)."""
    cfg = GPTQConfig()
    assert not cfg.act_order and cfg.clip_search and cfg.act_bits == 8 and cfg.asymmetric == 0.5
    qc = setting("w4a8")
    default = gptq_config_from_args(parse_args(["--quant", "w4a8", "--w-gptq"]), qc)
    assert default == GPTQConfig(seqlen=2048)
    off = gptq_config_from_args(parse_args(["--w-gptq", "--no-gptq-act-order", "--no-gptq-clip-search"]), qc)
    assert not off.act_order and not off.clip_search
    export_like = gptq_config_from_args(parse_args(["--w-gptq", "--gptq-windows", "8", "--gptq-seqlen", "1024"]), qc)
    assert (export_like.windows, export_like.seqlen) == (8, 1024)


def test_act_order_with_clip_beats_plain_gptq_on_an_outlier_channel():
    """The unrotated model's case: one input channel far larger than the rest (H_ii ≫ the others)."""
    h, w = correlated_hessian(128, seed=3), random_weight(32, 128, seed=4)
    plain = gptq_quantize(w, h, GPTQConfig(act_order=False, clip_search=False)).dequantize()
    act_order = gptq_quantize(w, h, GPTQConfig(act_order=True, clip_search=True)).dequantize()
    assert output_error(w, act_order, h) < output_error(w, plain, h)


def test_rtn_model_is_round_to_nearest_in_place():
    model = tiny_rotated_model()
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    result = rtn_model(model, GPTQConfig(method="rtn", clip_search=False))
    assert set(result) == set(before)
    for name, qw in result.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
        assert torch.equal(qw.qdata, round_to_nearest(before[name], GPTQConfig(clip_search=False)).qdata)


def test_calibration_with_int8_inputs_changes_the_hessians_and_leaves_no_hooks():
    windows = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    full, int8 = tiny_rotated_model(), tiny_rotated_model()
    int8.load_state_dict(full.state_dict())
    a = gptq_model(full, windows, GPTQConfig(act_bits=16), torch.device("cpu"), progress=False)
    b = gptq_model(int8, windows, GPTQConfig(act_bits=8), torch.device("cpu"), progress=False)
    assert any(not torch.equal(a[n].qdata, b[n].qdata) for n in a)
    assert all(not m._forward_pre_hooks for m in int8.modules())


def perturbed_inputs(n: int, tokens: int = 4096, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-precision model's inputs to a linear and the quantized model's (the layers before add correlated error)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    x_fp = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix
    x_fp[:, 3] *= 20
    return x_fp, x_fp + noise * torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix


@pytest.mark.parametrize("act_order", [False, True])
def test_asymmetric_calibration_fits_the_full_precision_output_better_than_gptq(act_order):
    """GPTAQ's setting: the quantized model's inputs X̃ differ from the full-precision model's X_fp. Against the
    full-precision output X_fp·Wᵀ, GPTQ of W' = W + a·W(C − H)(H + λI)⁻¹ errs less than plain GPTQ on X̃."""
    w = random_weight(32, 128, seed=4)
    x_fp, x_q = perturbed_inputs(128)
    h, cross = 2 * x_q.T @ x_q / len(x_q), 2 * x_fp.T @ x_q / len(x_q)

    def error(cfg: GPTQConfig) -> float:
        q = gptq_quantize(w, h, cfg, cross).dequantize().double()
        return (x_fp @ w.T - x_q @ q.T).pow(2).sum().item()

    plain = error(GPTQConfig(act_order=act_order, asymmetric=0.0))
    for a in (0.5, 1.0):
        assert error(GPTQConfig(act_order=act_order, asymmetric=a)) < 0.97 * plain, a
    # Same inputs in both models (C = H): the target is W itself, plain GPTQ exactly.
    same = gptq_quantize(w, h, GPTQConfig(act_order=act_order, asymmetric=1.0), h)
    assert torch.equal(same.qdata, gptq_quantize(w, h, GPTQConfig(act_order=act_order, asymmetric=0.0)).qdata)


def test_model_gptaq_calibrates_against_the_full_precision_model_and_leaves_no_hooks():
    windows = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    plain_model, gptaq_model = tiny_rotated_model(), tiny_rotated_model()
    gptaq_model.load_state_dict(plain_model.state_dict())
    plain = gptq_model(plain_model, windows, GPTQConfig(act_bits=16, asymmetric=0.0), torch.device("cpu"), progress=False)
    gptaq = gptq_model(gptaq_model, windows, GPTQConfig(act_bits=16, asymmetric=0.5), torch.device("cpu"), progress=False)
    # Layer 0's q/k/v see the embedding in both models: no asymmetry yet, the same integers.
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(plain[first].qdata, gptaq[first].qdata)
    assert any(not torch.equal(plain[n].qdata, gptaq[n].qdata) for n in plain if n.startswith("model.layers.1."))
    for name, qw in gptaq.items():
        assert torch.equal(gptaq_model.get_submodule(name).weight, qw.dequantize())
    assert all(not m._forward_pre_hooks for m in gptaq_model.modules())


@pytest.mark.parametrize("lm_head", [False, True])
def test_layer_at_a_time_gptq_equals_the_whole_model_reference(lm_head):
    """gptq_model runs each layer once per stage and the full-precision layer once; the reference reruns both whole
    models for every group. Same Hessians, so the same integers, lm_head's included."""
    windows = torch.randint(0, 128, (4, 40), generator=torch.Generator().manual_seed(0))
    ours, reference = tiny_rotated_model(), tiny_rotated_model()
    reference.load_state_dict(ours.state_dict())
    got = gptq_model(ours, windows, GPTQConfig(group=32), torch.device("cpu"), progress=False, lm_head=lm_head)
    want = whole_model_gptq(reference, windows, GPTQConfig(group=32), lm_head)
    assert set(got) == set(want) and ("lm_head" in got) == lm_head
    assert all(torch.equal(got[n].qdata, want[n].qdata) and torch.equal(got[n].scale, want[n].scale) for n in want)
    assert torch.equal(ours.lm_head.weight, reference.lm_head.weight) and all(not m._forward_pre_hooks for m in ours.modules())
