import math

import pytest
import torch

from spinquant.errors import UserError
from spinquant.hadamard import (
    SUPPORTED_K,
    TORCHAO_K,
    factor_size,
    hadamard_k,
    hadamard_matrix,
    hadamard_transform,
    paley_hadamard,
    random_hadamard_matrix,
    random_orthogonal_matrix,
)


@pytest.mark.parametrize("k", SUPPORTED_K)
def test_every_table_is_hadamard(k):
    h = hadamard_k(k)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", SUPPORTED_K)
@pytest.mark.parametrize("m", [1, 4, 32])
def test_matrix_orthonormal_and_fast_transform_matches_dense(k, m):
    n = k * m
    h = hadamard_matrix(n)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert (h.abs() - 1 / math.sqrt(n)).abs().max() < 1e-15
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert (hadamard_transform(x) - x @ h).abs().max() < 1e-12


def test_sizes_of_real_models_factor():
    assert factor_size(14336) == (28, 512)  # Llama 3 8B MLP
    assert factor_size(11008) == (172, 64)  # Llama 2 7B MLP
    assert factor_size(8960) == (140, 64)  # Qwen2.5-1.5B MLP
    assert factor_size(1536) == (12, 128)  # SmolLM2 MLP
    assert factor_size(8192) == (1, 8192)


def test_unsupported_size_names_it_and_block_fallback_is_orthonormal():  # 4352 = 17·2^8: no table of order 17·2^j
    with pytest.raises(UserError, match="4352"):
        hadamard_matrix(4352)
    h = hadamard_matrix(4352, block_fallback=True)
    assert (h @ h.T - torch.eye(4352, dtype=torch.float64)).abs().max() < 1e-12
    x = torch.randn(2, 4352, dtype=torch.float64)
    assert (hadamard_transform(x, block_fallback=True) - x @ h).abs().max() < 1e-12


def test_float32_transform_preserves_norm():
    x = torch.randn(64, 1536)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_random_rotations_are_orthonormal_and_seeded():
    for draw in (random_hadamard_matrix, random_orthogonal_matrix):
        r = draw(96, torch.Generator().manual_seed(1))
        assert (r @ r.T - torch.eye(96, dtype=torch.float64)).abs().max() < 1e-12
        assert torch.equal(r, draw(96, torch.Generator().manual_seed(1)))
        assert not torch.equal(r, draw(96, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("q, order", [(37, 76), (73, 148), (5, 12), (13, 28)])
def test_paley_construction_is_a_symmetric_hadamard_matrix_of_order_2_q_plus_1(q, order):
    h = paley_hadamard(q)
    assert h.shape == (order, order) and torch.equal(h, h.T) and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


@pytest.mark.parametrize("q", [3, 7, 21, 25])
def test_paley_construction_refuses_what_is_not_a_prime_1_mod_4(q):
    with pytest.raises(ValueError, match="prime q ≡ 1"):
        paley_hadamard(q)


def test_qwen_sizes_are_supported_and_torchao_sizes_keep_their_factorization():
    assert factor_size(4864) == (76, 64) and factor_size(18944) == (148, 128)  # Qwen2.5-0.5B's and -7B's MLPs
    for n in range(1, 40000):
        torchao = [k for k in (1, *TORCHAO_K) if n % k == 0 and (n // k) & (n // k - 1) == 0]
        if torchao:
            assert factor_size(n) == (torchao[0], n // torchao[0])  # the fused weights of every older size are unchanged
