"""QuIP#'s E8P codebook: 2¹⁶ distinct points of E8 ± ¼, decoded from 16-bit codes, and the exact nearest one found."""

import torch

from spinquant import e8p

ALL_CODES = torch.arange(1 << 16)


def test_patterns_are_d8_hat_within_sqrt10_and_29_of_norm_12():
    s = e8p.abs_patterns()
    norms = (s * s).sum(-1)
    assert s.shape == (256, 8) and len({tuple(row) for row in s.tolist()}) == 256
    assert (norms <= 10).sum() == 227 and (norms == 12).sum() == 29
    assert torch.all((2 * s) % 2 == 1)  # half-odd integers


def test_every_code_decodes_to_a_distinct_point_of_e8_shifted_by_a_quarter_and_back():
    points = e8p.decode(ALL_CODES)
    assert len({tuple(p) for p in points.tolist()}) == 1 << 16
    shift = torch.where((ALL_CODES >> 15) & 1 == 1, 0.25, -0.25)[:, None]
    lattice = points - shift  # D8 + ½: half-odd entries, even sum
    assert torch.all((2 * lattice) % 2 == 1) and torch.all(lattice.sum(-1) % 2 == 0)
    assert torch.all((4 * points) % 2 == 1)  # every weight an odd multiple of ¼
    assert torch.equal(e8p.encode(points), ALL_CODES.int())


def test_encode_finds_the_nearest_of_all_codewords():
    """Against the brute-force minimum over all 2¹⁶ codewords, in float64, at three source scales."""
    codebook = e8p.decode(ALL_CODES)
    norms = (codebook * codebook).sum(-1)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 1.2, 3.0):
        x = torch.randn(600, 8, dtype=torch.float64, generator=gen) * scale
        nearest = torch.cat([((c * c).sum(-1, keepdim=True) - 2 * c @ codebook.T + norms).min(-1).values for c in x.split(200)])
        ours = ((x - e8p.decode(e8p.encode(x))) ** 2).sum(-1)
        assert (ours - nearest).abs().max() < 1e-12


def test_quantize_replaces_each_group_of_eight():
    w = torch.randn(3, 24, dtype=torch.float64)
    q = e8p.quantize(w)
    assert q.shape == w.shape
    assert torch.equal(q[:, 8:16], e8p.decode(e8p.encode(w[:, 8:16])))
