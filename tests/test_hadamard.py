import math

import pytest
import torch

from spinquant.errors import UserError
from spinquant.hadamard import (
    SUPPORTED_K,
    factor_size,
    hadamard_k,
    hadamard_matrix,
    hadamard_transform,
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


def test_unsupported_size_names_it_and_block_fallback_is_orthonormal():
    with pytest.raises(UserError, match="4864"):
        hadamard_matrix(4864)
    h = hadamard_matrix(4864, block_fallback=True)
    assert (h @ h.T - torch.eye(4864, dtype=torch.float64)).abs().max() < 1e-12
    x = torch.randn(2, 4864, dtype=torch.float64)
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
