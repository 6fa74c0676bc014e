"""QuIP#'s BlockLDLQ and incoherence, against slow float64 references."""

import math

import pytest
import torch

from spinquant import e8p, e81b
from spinquant.errors import UserError
from spinquant.eval import main as eval_main
from spinquant.gptq import GPTQConfig, GPTQResult, gptq_model
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.quant import QuantConfig, quantize_weight
from spinquant.quip import CODEBOOK_SCALE, RESIDUAL_GAIN, E8PWeight, block_ldlq, incoherence_rotations, quip_e8p


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
    assert scale.item() == pytest.approx(turned.pow(2).mean().sqrt().item() * CODEBOOK_SCALE[2], rel=1e-7)  # float32's rounding
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
    errors = {s: ((x - s * e8p.quantize(x / s)) ** 2).mean().item() for s in (0.85, CODEBOOK_SCALE[2], 1.1)}
    assert errors[CODEBOOK_SCALE[2]] < min(errors[0.85], errors[1.1])


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
    scale = (turned.pow(2).mean().sqrt() * CODEBOOK_SCALE[2]).float().double()
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
    assert eval_main(args + ["--w-bits", "3"])["quant"]["w_bits"] == 3
    with pytest.raises(UserError, match="--w-codebook e8p is 2, 3 or 4 bits a weight, not 8"):
        eval_main(args + ["--w-bits", "8"])


def brute_force_e81b(x: torch.Tensor) -> torch.Tensor:
    """Each group of 8 replaced by the nearest E81B point, from the lattice's definition: the points of E8 (all
    coordinates integers or all half-integers, even sum) of norm² ≤ 2, and ±2·e_i but −2·e_7."""
    half = torch.cartesian_prod(*[torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)] * 8)
    whole = torch.cartesian_prod(*[torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)] * 8)
    e8 = torch.cat([half, whole])
    norm = (e8 * e8).sum(-1)
    axis = (e8.abs() == 2).sum(-1) == 1
    keep = (e8.sum(-1) % 2 == 0) & ((norm <= 2) | (axis & (norm == 4))) & ~(axis & (e8[:, 7] == -2))
    points = e8[keep]
    assert len(points) == 256
    groups = x.reshape(-1, 8)
    return points[torch.cdist(groups, points).argmin(-1)].reshape(x.shape)


def test_e81b_codes_are_the_nearest_of_its_256_points_and_decode_to_them():
    assert torch.equal(e81b.encode(e81b.decode(torch.arange(256))), torch.arange(256))
    x = 0.8 * torch.randn(3000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(e81b.decode(e81b.encode(x)), brute_force_e81b(x))


@pytest.mark.parametrize("bits", [3, 4])
def test_residual_codes_round_what_the_first_codeword_leaves(bits):
    """Round to nearest at 3 and 4 bits: the first stage E8P's nearest codeword, the second the nearest point of the
    residual's codebook to what is left times the gain, both from brute-force searches."""
    w = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    stored = quip_e8p(w, bits=bits)
    r_out, r_in = incoherence_rotations(16, 64, 0)
    y = (r_out.T @ w @ r_in) / stored.scale.double()
    first = brute_force_nearest(y)
    gain = RESIDUAL_GAIN[bits]
    second = (brute_force_nearest if bits == 4 else brute_force_e81b)(gain * (y - first)) / gain
    assert (stored.codewords() - (first + second)).abs().max() < 1e-12
    assert stored.residual.dtype == (torch.uint8 if bits == 3 else torch.int16)
    assert (stored.dequantize() - r_out @ ((first + second) * stored.scale.double()) @ r_in.T).abs().max() < 1e-12


@pytest.mark.parametrize("bits", [3, 4])
def test_scale_and_gain_are_the_least_squared_error_for_a_gaussian(bits):
    x = torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    book = e8p if bits == 4 else e81b

    def error(s: float, g: float) -> float:
        first = e8p.quantize(x / s)
        second = book.decode(book.encode((g * (x / s - first)).unflatten(-1, (-1, 8)))).flatten(-2) / g
        return ((x - s * (first + second)) ** 2).mean().item()

    s, g = CODEBOOK_SCALE[bits], RESIDUAL_GAIN[bits]
    best = error(s, g)
    assert all(best < error(s * a, g * b) for a, b in ((0.85, 1), (1.15, 1), (1, 0.8), (1, 1.25)))
    assert best < {3: 0.031, 4: 0.0088}[bits]  # the module's figures, 0.0299 and 0.0085, on other samples


@pytest.mark.parametrize("bits", [3, 4])
def test_blockldlq_with_residual_codes_holds_them_and_beats_rounding(bits, tmp_path):
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(32, 128, dtype=torch.float64, generator=gen)
    h = correlated_hessian(128, seed=15)
    stored = quip_e8p(w, h, seed=3, bits=bits)
    nearest = quip_e8p(w, seed=3, bits=bits).dequantize()

    def proxy(q):
        d = q - w
        return torch.trace(d @ h @ d.T).item()

    assert proxy(stored.dequantize()) < 0.8 * proxy(nearest)
    two_bit = quip_e8p(w, h, seed=3).dequantize()
    assert proxy(stored.dequantize()) < 0.5 * proxy(two_bit)  # the residual code pays
    cfg = GPTQConfig(bits=bits, codebook="e8p")
    GPTQResult({"layer": stored}, cfg, "tiny", "none", "calib", "0" * 64, 1, 0.0).save(tmp_path / "rvq.pt")
    loaded = GPTQResult.load(tmp_path / "rvq.pt").weights["layer"]
    assert loaded.bits == bits and torch.equal(loaded.residual, stored.residual) and torch.equal(loaded.dequantize(), stored.dequantize())


def test_e8p_bits_other_than_2_3_4_are_refused():
    with pytest.raises(UserError, match="E8P codes are 2, 3 or 4 bits a weight, not 5"):
        quip_e8p(torch.zeros(4, 16), bits=5)
