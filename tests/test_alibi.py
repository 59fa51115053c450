"""ALiBi slopes and the 2D distance bias against values written out from the papers' formulas."""

import math

import numpy as np
import pytest
import torch

from slidefm.models.alibi import Alibi2DBias, alibi_2d_bias, alibi_slopes

pytestmark = pytest.mark.usefixtures("one_thread")


# Exponents e_h in slope_h = 2^(-e_h), spelled out from Press et al. (power-of-two H: 8h/H) and
# BLOOM's rule for other H: the 2^floor(log2 H) power-of-two slopes, then the odd-indexed
# slopes of twice that many heads.
EXPONENTS = {
    1: [8.0],
    4: [2.0, 4.0, 6.0, 8.0],
    6: [2.0, 4.0, 6.0, 8.0, 1.0, 3.0],
    8: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
    12: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5, 1.5, 2.5, 3.5],
    16: [0.5 * k for k in range(1, 17)],
    20: [0.5 * k for k in range(1, 17)] + [0.25, 0.75, 1.25, 1.75],
}


@pytest.mark.parametrize("heads", sorted(EXPONENTS))
def test_slopes_match_the_paper_recipe(heads):
    want = torch.tensor([2.0 ** (-e) for e in EXPONENTS[heads]])
    got = alibi_slopes(heads)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_slopes_reject_zero_heads():
    with pytest.raises(ValueError):
        alibi_slopes(0)


def _bias_loop(grid: np.ndarray, heads: int, n_prefix: int) -> np.ndarray:
    slopes = [2.0 ** (-e) for e in EXPONENTS[heads]]
    n = len(grid)
    out = np.zeros((heads, n_prefix + n, n_prefix + n))
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                d = math.hypot(grid[i, 0] - grid[j, 0], grid[i, 1] - grid[j, 1])
                out[h, n_prefix + i, n_prefix + j] = -slopes[h] * d
    return out


@pytest.mark.parametrize("n_prefix", [0, 1, 3])
def test_2d_bias_equals_loop(n_prefix):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 40, size=(23, 2))
    got = alibi_2d_bias(torch.from_numpy(grid), 6, num_prefix_tokens=n_prefix)
    assert got.shape == (6, n_prefix + 23, n_prefix + 23)
    np.testing.assert_allclose(got.numpy(), _bias_loop(grid, 6, n_prefix), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "rows, cols", [((0, 1), (0, 17)), ((0, 5), (3, 9)), ((1, 9), (0, 2)), ((9, 17), (2, 17))]
)
def test_bias_block_is_the_tile_of_the_loop(rows, cols):
    """``Alibi2DBias.block`` (what the blockwise kernels call) = that tile of the formula,
    prefix rows/columns included, for every batch element."""
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 20, size=(2, 15, 2))
    blk = Alibi2DBias.from_grid(torch.from_numpy(grid), 4, 2).block(slice(*rows), slice(*cols))
    assert blk.shape == (2, 4, rows[1] - rows[0], cols[1] - cols[0])
    assert blk.dtype == torch.float32
    for b in range(2):
        want = _bias_loop(grid[b], 4, 2)[:, slice(*rows), slice(*cols)]
        np.testing.assert_allclose(blk[b].numpy(), want, rtol=1e-6, atol=1e-6)
