"""QuIP#'s BlockLDLQ and incoherence, against slow float64 references."""

import math

import pytest
import torch

from spinquant import e8p
from spinquant.errors import UserError
from spinquant.eval import main as eval_main
from spinquant.gptq import GPTQConfig, GPTQResult, gptq_model
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.quant import QuantConfig, quantize_weight
from spinquant.quip import CODEBOOK_SCALE, E8PWeight, block_ldlq, incoherence_rotations, quip_e8p


def correlated_hessian(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, dtype=torch.float64, generator=gen) @ torch.randn(n, n, dtype=torch.float64, generator=gen)
    return 2 * x.T @ x / x.shape[0]


def schur_reference(w: torch.Tensor, h: torch.Tensor, quantize, block: int, damp: float) -> torch.Tensor:
    """Optimal Brain Surgeon a block at a time, from the damped inverse Hessian itself: quantize a block, move the
    remaining columns by −E·(H⁻¹_bb)⁻¹·H⁻¹_b,rest, take the Schur complement as the remaining columns' inverse Hessian."""
    w = w.clone()
    h_inv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype))
    q = torch.empty_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = b0 + block
        q[:, b0:b1] = quantize(w[:, b0:b1])
        inv_bb = torch.linalg.inv(h_inv[:block, :block])
        w[:, b1:] -= (w[:, b0:b1] - q[:, b0:b1]) @ inv_bb @ h_inv[:block, block:]
        h_inv = h_inv[block:, block:] - h_inv[block:, :block] @ inv_bb @ h_inv[:block, block:]
    return q


@pytest.mark.parametrize("block", [1, 8])
def test_block_ldlq_is_optimal_brain_surgeon_block_by_block(block):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 48, dtype=torch.float64, generator=gen)
    h = correlated_hessian(48)

    def to_grid(x):
        return torch.round(x * 2) / 2

    ours = block_ldlq(w, h, to_grid, block=block)
    assert torch.equal(ours, schur_reference(w, h, to_grid, block, 0.01))
    assert not torch.equal(ours, to_grid(w))  # the feedback moved some roundings


def test_quip_e8p_holds_codewords_in_the_incoherent_basis_and_beats_nearest_rounding():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 192, dtype=torch.float64, generator=gen)
    w[:, 7] *= 30  # an outlier input, which incoherence spreads
    h = correlated_hessian(192, seed=3)
    stored = quip_e8p(w, h, seed=5)
    ours = stored.dequantize()
    r_out, r_in = incoherence_rotations(64, 192, 5)
    turned = r_out.T @ w @ r_in
    scale = stored.scale.double()
    assert scale.item() == pytest.approx(turned.pow(2).mean().sqrt().item() * CODEBOOK_SCALE, rel=1e-7)  # float32's rounding
    codes = (r_out.T @ ours @ r_in) / scale
    assert (e8p.quantize(codes) - codes).abs().max() < 1e-9  # every group of 8 is a codeword
    assert stored.codes.dtype == torch.int16 and torch.equal(e8p.decode(stored.codes.long() & 0xFFFF).flatten(-2), codes.round(decimals=9))

    def proxy(q):  # the layer's output error on its calibration inputs, tr(ΔHΔᵀ)
        d = q - w
        return torch.trace(d @ h @ d.T).item()

    nearest = r_out @ (e8p.quantize(turned / scale) * scale) @ r_in.T
    assert proxy(ours) < 0.8 * proxy(nearest)


def test_codebook_scale_is_the_least_squared_error_for_a_gaussian():
    x = torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors = {s: ((x - s * e8p.quantize(x / s)) ** 2).mean().item() for s in (0.85, CODEBOOK_SCALE, 1.1)}
    assert errors[CODEBOOK_SCALE] < min(errors[0.85], errors[1.1])


def test_a_weight_whose_inputs_are_not_a_multiple_of_eight_is_refused():
    with pytest.raises(UserError, match="this weight has 12: a multiple of 8 is needed"):
        quip_e8p(torch.zeros(4, 12), torch.eye(12))


def brute_force_nearest(x: torch.Tensor) -> torch.Tensor:
    """Each group of 8 of x replaced by the nearest of all 2¹⁶ codewords (float64 distances to every one)."""
    codebook = e8p.decode(torch.arange(1 << 16))
    groups = x.reshape(-1, e8p.DIM)
    distance = (groups * groups).sum(-1, keepdim=True) - 2 * groups @ codebook.T + (codebook * codebook).sum(-1)
    return codebook[distance.argmin(-1)].reshape(x.shape)


def test_e8p_round_to_nearest_is_the_nearest_codeword_of_each_group_in_the_incoherent_basis():
    w = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ours = quantize_weight(w, QuantConfig(w_bits=2, w_codebook="e8p"))
    r_out, r_in = incoherence_rotations(16, 64, 0)
    turned = r_out.T @ w @ r_in
    scale = (turned.pow(2).mean().sqrt() * CODEBOOK_SCALE).float().double()
    assert (ours - r_out @ (brute_force_nearest(turned / scale) * scale) @ r_in.T).abs().max() < 1e-12


def test_gptq_with_the_e8p_codebook_puts_every_decoder_linear_on_codes_and_saves_them(tmp_path):
    model = tiny_llama(tiny_llama_config(hidden=64, intermediate=128, heads=4, kv_heads=2), dtype=torch.float32)
    windows = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(bits=2, codebook="e8p")
    weights = gptq_model(model, windows, cfg, torch.device("cpu"), progress=False)
    assert len(weights) == 2 * 7
    for name, qw in weights.items():
        assert isinstance(qw, E8PWeight) and qw.codes.dtype == torch.int16
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize().float())
    result = GPTQResult(weights, cfg, "tiny", "none", "calib", "0" * 64, 4, 0.0)
    result.save(tmp_path / "e8p.pt")
    loaded = GPTQResult.load(tmp_path / "e8p.pt")
    assert loaded.config.codebook == "e8p"
    assert all(torch.equal(loaded.weights[n].dequantize(), qw.dequantize()) for n, qw in weights.items())


def test_eval_runs_e8p_with_and_without_blockldlq_and_refuses_other_bits(tiny_hf_dir):
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--quant", "w4a8", "--w-codebook", "e8p"]
    nearest = eval_main(args)
    ldlq = eval_main(args + ["--w-gptq", "--calib-text", str(tiny_hf_dir.parent / "text.txt"), "--gptq-windows", "4", "--text", str(tiny_hf_dir / "tokenizer.json")])
    assert nearest["quant"]["w_bits"] == 2 and ldlq["gptq"]["config"]["codebook"] == "e8p"
    assert math.isfinite(nearest["perplexity"]) and math.isfinite(ldlq["perplexity"])
    with pytest.raises(UserError, match="--w-codebook e8p is 2 bits a weight, not 4"):
        eval_main(args + ["--w-bits", "4"])
