"""The deformable attention's gather formulations equal its grid_sample transcription.

``DeformableGridAttention.forward`` samples the four cells around each point itself (one
fused weighted gather) and applies W_q through the offset and point-weight heads; the
reference ``forward_grid_sample`` is Eq. 3-8 written with ``F.grid_sample``. Both must give
the same outputs and the same gradients (inputs and every parameter), on grids with holes,
padding rows, points off the grid and more than one bag.
"""

from __future__ import annotations

import copy

import pytest
import torch

from wsimil.models.deformable import DeformableGridAttention, through_heads


def pair(
    dtype: torch.dtype, seed: int, formulation: str = "gather"
) -> tuple[DeformableGridAttention, DeformableGridAttention]:
    torch.manual_seed(seed)
    fast = DeformableGridAttention(16, 4, 3, 2.5).to(dtype)
    fast.formulation = formulation
    with torch.no_grad():  # away from the zero init: offsets and point weights vary per query
        for p in fast.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(fast)
    reference.formulation = "grid_sample"
    return fast, reference


def bags(dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, N = 3, 20
    x = torch.randn(B, N, 16, generator=gen, dtype=dtype)
    cells = torch.stack([torch.randperm(40, generator=gen)[:N] for _ in range(B)])
    grid = torch.stack([cells % 7 + 3, cells // 7 + 1], -1)  # holes; not at the origin
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, 5:] = False
    return x, grid, mask


def outputs_and_grads(module, x, grid, mask, upstream):
    x = x.clone().requires_grad_(True)
    out = module(x, grid, mask)
    (out.out * upstream).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, x.grad, grads


@pytest.mark.parametrize("formulation", ["gather", "index"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_equals_grid_sample_forward_and_backward(seed, formulation):
    """Both fast formulations: the fused gather, and the vmap-able lookup + matmul."""
    dtype = torch.float64  # the formulations are equal; float64 shows it beyond rounding
    fast, reference = pair(dtype, seed, formulation)
    x, grid, mask = bags(dtype, seed)
    upstream = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    got, gx, grads = outputs_and_grads(fast, x, grid, mask, upstream)
    want, rx, rgrads = outputs_and_grads(reference, x, grid, mask, upstream)
    torch.testing.assert_close(got.out, want.out, atol=1e-9, rtol=0)
    torch.testing.assert_close(got.offsets, want.offsets, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx, rx, atol=1e-9, rtol=0)
    assert rgrads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], rgrads[name], atol=1e-9, rtol=0, msg=name)
    assert gx.abs().sum() > 0 and grads["sampling_offsets.weight"].abs().sum() > 0


def test_gather_equals_grid_sample_in_float32_at_the_default_init():
    """float32, the params.yaml shape (d 512, 8 heads, 4 points, c 3), a 200-tile grid."""
    torch.manual_seed(0)
    fast = DeformableGridAttention(512, 8, 4, 3.0)
    with torch.no_grad():
        # the init puts the points of the axis-aligned heads exactly on cell boundaries,
        # where bilinear sampling has a kink: the offsets' gradient there is one-sided, and
        # the two formulations may take different sides. Nudge them off it.
        fast.sampling_offsets.bias.add_(1e-3 * torch.randn(fast.sampling_offsets.bias.shape))
    reference = copy.deepcopy(fast)
    reference.formulation = "grid_sample"
    gen = torch.Generator().manual_seed(0)
    cells = torch.randperm(300, generator=gen)[:200]
    grid = torch.stack([cells % 15, cells // 15], -1)[None]
    x = torch.randn(1, 200, 512, generator=gen)
    mask = torch.ones(1, 200, dtype=torch.bool)
    upstream = torch.randn(1, 200, 512, generator=gen)
    got, gx, grads = outputs_and_grads(fast, x, grid, mask, upstream)
    want, rx, rgrads = outputs_and_grads(reference, x, grid, mask, upstream)
    for name, a, b in [("out", got.out, want.out), ("x", gx, rx)] + [
        (name, grads[name], rgrads[name]) for name in grads
    ]:  # float32 rounding: within 1e-5 of each tensor's largest entry
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-3), name


def test_points_past_the_border_get_no_weight_as_in_grid_sample():
    """A 3 x 4 grid and offsets up to 3.5 cells: most points leave it, many by more than the
    one-cell border; the ones that touch it from outside keep their inside corners."""
    dtype = torch.float64
    torch.manual_seed(3)
    fast = DeformableGridAttention(16, 4, 3, 3.5).to(dtype)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.2 * torch.randn_like(p))
    reference = copy.deepcopy(fast)
    reference.formulation = "grid_sample"
    gen = torch.Generator().manual_seed(3)
    cells = torch.stack([torch.randperm(12, generator=gen)[:10] for _ in range(2)])
    grid = torch.stack([cells % 4, cells // 4], -1)
    x = torch.randn(2, 10, 16, generator=gen, dtype=dtype)
    mask = torch.ones(2, 10, dtype=torch.bool)
    upstream = torch.randn(x.shape, dtype=dtype, generator=gen)
    got, gx, grads = outputs_and_grads(fast, x, grid, mask, upstream)
    want, rx, rgrads = outputs_and_grads(reference, x, grid, mask, upstream)
    loc = grid[:, :, None, None, :] + got.offsets.detach()  # (B, N, M, U, 2) cells
    col, row = loc.unbind(-1)
    far = (col < -1) | (col >= 4) | (row < -1) | (row >= 3)  # all four cells off the grid
    edge = ~far & ((col < 0) | (col > 3) | (row < 0) | (row > 2))  # some cells off it
    assert far.float().mean() > 0.2 and edge.float().mean() > 0.1  # both cases are tested
    torch.testing.assert_close(got.out, want.out, atol=1e-9, rtol=0)
    torch.testing.assert_close(gx, rx, atol=1e-9, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], rgrads[name], atol=1e-9, rtol=0, msg=name)


@pytest.mark.parametrize("n_tiles", [5, 12, 40])
def test_queries_through_w_q_or_through_the_heads_product_agree(n_tiles):
    """Up to 3MU instances z_q is formed with W_q, beyond through the heads' product with
    W_q; either way the module equals its grid_sample transcription."""
    dtype = torch.float64
    fast, reference = pair(dtype, 3)
    rank = 3 * fast.heads * fast.points  # 36
    assert through_heads(n_tiles, rank) == (n_tiles > rank)
    gen = torch.Generator().manual_seed(n_tiles)
    x = torch.randn(1, n_tiles, 16, generator=gen, dtype=dtype)
    cells = torch.randperm(64, generator=gen)[:n_tiles]
    grid = torch.stack([cells % 8, cells // 8], -1).unsqueeze(0)
    mask = torch.ones(1, n_tiles, dtype=torch.bool)
    upstream = torch.randn(x.shape, dtype=dtype, generator=gen)
    got, gx, grads = outputs_and_grads(fast, x, grid, mask, upstream)
    want, rx, rgrads = outputs_and_grads(reference, x, grid, mask, upstream)
    torch.testing.assert_close(got.out, want.out, atol=1e-9, rtol=0)
    torch.testing.assert_close(gx, rx, atol=1e-9, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], rgrads[name], atol=1e-9, rtol=0, msg=name)
