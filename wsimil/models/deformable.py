"""Intra-scale deformable attention over the tile grid (DMSMIL §2.4, Eq. 3-8; SPEC §4).

The K instances of one scale sit on a 2-D grid at their tile positions; empty cells are zero
and carry zero occupancy. For a query q at its own cell r_q:

    z_q      = W_q x_q
    Δr_mqu   = c · tanh(Linear_2MU(z_q))            (Eq. 3, scaled; in grid cells)
    A_mqu    = softmax_u(Linear_MU(z_q))             (Eq. 4)
    x̂_q      = Σ_m W_m [ Σ_u A_mqu · W'_m x̃(r_q + Δr_mqu) ]          (Eq. 7-8)

x̃(·) is bilinear sampling of the grid. The occupancy is sampled with the same weights and
each head's sum is divided by its sampled occupancy mass Σ_u A_mqu · occ(r_q + Δr_mqu), so
empty cells (and points outside the grid) get no weight and the remaining weights still sum
to one. Cost O(K·M·U·d): linear in K.

How it is computed (the same numbers as the direct transcription with ``F.grid_sample``,
kept as :meth:`DeformableGridAttention.forward_grid_sample`; ``tests/test_deformable.py``):
the values sit on a dense grid with a border of one empty cell, each (cell, head) row holding
the head's dh value channels and the occupancy; the four cells around every point are looked
up and summed with their bilinear × A_mqu weights in one fused weighted gather
(``F.embedding_bag``), which gives each head's sum and its occupancy mass at once. The border
keeps the four cells of any point that touches the grid inside its own bag, so a point needs
one validity test, not four. On a bag of more than 3MU instances z_q is never formed: it only
feeds Linear_2MU and Linear_MU, so their product with W_q (3MU × d) is applied instead
(:func:`through_heads`). On CPU that is the sampling without grid_sample's slow backward and
a 3MU-wide matmul instead of a d × d one; what is left is the value and output projections
(``benchmarks/deformable.py``, README "Benchmarks").

Choices where the paper is silent: W'_m are the M row blocks of one d×d value projection and
W_m the column blocks of one d×d output projection (Deformable DETR's layout); there is no
residual or feed-forward after Eq. 8 (x̂ is the module's output); two instances on one cell
(which tiling never produces) are averaged; offsets start at zero weight with biases that
spread each head's points along its own direction, and attention logits start at zero
(uniform over points), as in Deformable DETR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def local_grid(grid: Tensor, mask: Tensor) -> Tensor:
    """``grid (B, N, 2)`` shifted so each bag's real tiles start at cell (0, 0); padding 0."""
    far = torch.iinfo(grid.dtype).max
    origin = grid.masked_fill(~mask.unsqueeze(-1), far).amin(dim=1, keepdim=True)  # (B,1,2)
    return (grid - origin.clamp_max(far - 1)).masked_fill(~mask.unsqueeze(-1), 0)


def grid_extent(grid: Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the dense grid a :func:`local_grid` needs (``Bags.grid_hw``)."""
    return int(grid[..., 1].max()) + 1, int(grid[..., 0].max()) + 1


def through_heads(rows: int, rank: int) -> bool:
    """Whether ``rows`` queries are cheaper through the heads' product with W_q (rank × d,
    formed once: rank·d² multiply-adds) than through W_q itself (rows·d²): rows > rank.

    Both give the same z up to float rounding. The product wins on slide-sized bags (K = 200
    per scale against 3MU = 96) and loses on the demo's 48 tiles and on small served bags.
    """
    return rows > rank


@dataclass
class DeformableOutput:
    out: Tensor  # (B, N, d)
    offsets: Tensor  # (B, N, M, U, 2) in grid cells, (col, row)
    weights: Tensor  # (B, N, M, U) A_mqu, before the occupancy renormalisation


class DeformableGridAttention(nn.Module):
    """Multi-head deformable attention of every instance over its scale's tile grid."""

    def __init__(self, dim: int, heads: int, points: int, offset_scale: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.points, self.offset_scale = heads, points, offset_scale
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)  # W_q
        self.sampling_offsets = nn.Linear(dim, 2 * heads * points)  # Linear_2MU, Eq. 3
        self.attention_weights = nn.Linear(dim, heads * points)  # Linear_MU, Eq. 4
        self.value = nn.Linear(dim, dim)  # W'_m of all heads
        self.output = nn.Linear(dim, dim)  # W_m of all heads
        # gather: one fused weighted lookup (F.embedding_bag), the fastest alone; index: the
        # same sum in ops torch.func.vmap has batching rules for (the served fold ensemble,
        # wsimil/serve/one_pass.py); grid_sample: the reference transcription
        self.formulation: Literal["gather", "index", "grid_sample"] = "gather"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        M, U, c = self.heads, self.points, self.offset_scale
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2 * math.pi / M)
        direction = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        direction = direction / direction.abs().amax(-1, keepdim=True)  # on the unit square
        radius = torch.arange(1, U + 1, dtype=torch.float32) * c / (U + 1)  # (U,) all < c
        target = direction[:, None, :] * radius[None, :, None]  # (M, U, 2) cells
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(torch.atanh(target / c).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.query, self.value, self.output):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: Tensor, grid: Tensor, mask: Tensor, grid_hw: tuple[int, int] | None = None
    ) -> DeformableOutput:
        """Attend ``x (B, N, d)`` at ``grid (B, N, 2)`` (col, row); ``mask (B, N)``."""
        if self.formulation == "grid_sample":
            return self.forward_grid_sample(x, grid, mask, grid_hw)
        B, N, d = x.shape
        M, U, dh = self.heads, self.points, self.head_dim
        grid, (H, W) = _on_grid(grid, mask, grid_hw)

        # z_q feeds only Linear_2MU and Linear_MU: for more than 3MU rows, apply their
        # product with W_q (rank 3MU) instead of the d x d W_q itself; the parameters are
        # unchanged
        heads_w = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
        heads_b = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])
        if through_heads(B * N, heads_w.shape[0]):
            w = heads_w @ self.query.weight  # (3MU, d)
            b = torch.addmv(heads_b, heads_w, self.query.bias)  # (3MU,)
            z = F.linear(x, w, b)
        else:
            z = F.linear(self.query(x), heads_w, heads_b)
        zo, za = z.split([2 * M * U, M * U], dim=-1)
        offsets = (self.offset_scale * torch.tanh(zo)).view(B, N, M, U, 2)  # cells, Eq. 3
        weights = torch.softmax(za.view(B, N, M, U), dim=-1)  # (B, N, M, U), Eq. 4

        # the dense grid with a border of empty cells: per cell and head, the dh value
        # channels and the occupancy, so one weighted gather sums both
        Hp, Wp = H + 2, W + 2
        m = mask.to(x.dtype).view(B, N, 1, 1)
        v = self.value(x).view(B, N, M, dh)
        cells = torch.cat([v, m.expand(B, N, M, 1)], -1) * m  # (B, N, M, dh + 1)
        first = torch.arange(B, device=x.device).view(B, 1) * (Hp * Wp)  # each bag's cell 0
        cell = (first + (grid[..., 1] + 1) * Wp + grid[..., 0] + 1).flatten()  # (B·N,)
        dense = x.new_zeros(B * Hp * Wp, M, dh + 1).index_add(0, cell, cells.flatten(0, 1))

        # bilinear sampling at r_q + Δr: the 2 x 2 cells from floor(r_q + Δr), which the
        # border keeps inside the bag; a point with none of the grid's cells among them
        # gets no weight
        loc = grid[:, :, None, None, :].to(x.dtype) + offsets  # (B, N, M, U, 2)
        lo = loc.detach().floor()
        fx, fy = (loc - lo).unbind(-1)  # (B, N, M, U) weight of the right / lower cell
        gx, gy = 1 - fx, 1 - fy
        lx, ly = lo.long().unbind(-1)
        seen = (lx >= -1) & (lx < W) & (ly >= -1) & (ly < H)  # (B, N, M, U)
        A = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], -1) * (weights * seen)[..., None]
        top_left = torch.where(seen, (ly + 1) * Wp + lx + 1, 0) + first.view(B, 1, 1, 1)
        corner = torch.tensor([0, 1, Wp, Wp + 1], device=x.device)  # A's order, 4th axis
        head_of = torch.arange(M, device=x.device).view(M, 1, 1)
        rows = (top_left.unsqueeze(-1) + corner) * M + head_of  # (B, N, M, U, 4) of dense
        if self.formulation == "gather":
            mixed = F.embedding_bag(  # Σ over the 4U cells, weighted, fused: values and mass
                rows.view(-1, 4 * U),
                dense.view(-1, dh + 1),
                mode="sum",
                per_sample_weights=A.view(-1, 4 * U),
            )
        else:  # "index": the same sum as a row lookup and a batched matmul, which vmap batches
            picked = dense.view(-1, dh + 1).index_select(0, rows.view(-1))
            mixed = torch.bmm(A.view(-1, 1, 4 * U), picked.view(-1, 4 * U, dh + 1))
        mixed = mixed.view(B, N, M, dh + 1)
        head = mixed[..., :dh] / mixed[..., dh:].clamp_min(1e-6)  # renormalised per head
        return DeformableOutput(self.output(head.reshape(B, N, d)), offsets, weights)

    def forward_grid_sample(
        self, x: Tensor, grid: Tensor, mask: Tensor, grid_hw: tuple[int, int] | None = None
    ) -> DeformableOutput:
        """The same attention written with ``F.grid_sample`` on a dense per-head grid.

        The direct transcription of Eq. 3-8, kept as the reference :meth:`forward` is tested
        against (``tests/test_deformable.py``) and timed against (``benchmarks/deformable.py``).
        """
        B, N, d = x.shape
        M, U, dh = self.heads, self.points, self.head_dim
        grid, (H, W) = _on_grid(grid, mask, grid_hw)

        z = self.query(x)  # (B, N, d)
        offsets = self.offset_scale * torch.tanh(self.sampling_offsets(z))
        offsets = offsets.view(B, N, M, U, 2)  # (B, N, M, U, 2) cells
        weights = torch.softmax(self.attention_weights(z).view(B, N, M, U), dim=-1)

        # dense grid: per head, dh value channels + 1 occupancy channel
        m = mask.to(x.dtype)[..., None, None]  # (B, N, 1, 1)
        v = self.value(x).view(B, N, M, dh)  # (B, N, M, dh)
        cells = torch.cat([v * m, m.expand(B, N, M, 1)], dim=-1).view(B, N, M * (dh + 1))
        index = (grid[..., 1] * W + grid[..., 0]).unsqueeze(-1).expand_as(cells)  # (B, N, .)
        dense = x.new_zeros(B, H * W, M * (dh + 1)).scatter_add(1, index, cells)
        dense = dense.view(B, H, W, M, dh + 1).permute(0, 3, 4, 1, 2)  # (B, M, dh+1, H, W)
        dense = dense.reshape(B * M, dh + 1, H, W)

        # bilinear sampling at r_q + Δr; pixel centres at (2i + 1) / size - 1
        loc = grid[:, :, None, None, :].to(x.dtype) + offsets  # (B, N, M, U, 2)
        size = torch.tensor([W, H], dtype=x.dtype, device=x.device)
        loc = (2 * loc + 1) / size - 1
        loc = loc.permute(0, 2, 1, 3, 4).reshape(B * M, N, U, 2)  # (B·M, N, U, 2)
        sampled = F.grid_sample(
            dense, loc, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B·M, dh+1, N, U)

        A = weights.permute(0, 2, 1, 3).reshape(B * M, N, U)  # (B·M, N, U)
        mixed = torch.einsum("kcnu,knu->kcn", sampled, A)  # (B·M, dh+1, N)
        head = mixed[:, :dh] / mixed[:, dh:].clamp_min(1e-6)  # renormalise by occupancy
        head = head.view(B, M, dh, N).permute(0, 3, 1, 2).reshape(B, N, d)  # (B, N, M·dh)
        return DeformableOutput(self.output(head), offsets, weights)


def _on_grid(
    grid: Tensor, mask: Tensor, grid_hw: tuple[int, int] | None
) -> tuple[Tensor, tuple[int, int]]:
    """Cells relative to the bag's top-left instance (padding rows at 0), and (H, W)."""
    grid = local_grid(grid, mask)
    return grid, grid_extent(grid) if grid_hw is None else grid_hw
