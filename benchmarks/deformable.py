"""DMSMIL's deformable attention: its cost in a training step, before and after.

    python benchmarks/deformable.py [--tiles 200] [--repeats 15] [--threads 1]

One DMSMIL training step (forward, the model's loss, backward) on one slide of K tiles per
scale, 2048-D features, the params.yaml defaults, with:
- ``deformable: false`` (the plain per-scale projection the attention follows);
- the attention written with ``F.grid_sample`` (``forward_grid_sample``, the transcription
  of Eq. 3-8 this code used before);
- the attention as the model runs it now (``forward``: fused weighted gather, W_q applied
  through the offset and point-weight heads).
Each with ``ot: exact`` (the default) and ``ot: off``. The variants run interleaved, so a
load change on a shared machine hits them alike; the median of ``--repeats`` steps is
printed, with the ratios to ``deformable: false`` and the largest logit and gradient
difference between the two formulations. No timing asserts: this only measures.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from wsimil.config import ModelConfig
from wsimil.models import Bags, build_model

D_IN = 2048


def model(deformable: bool, formulation: str, ot: str):
    cfg = ModelConfig()
    section = cfg.dmsmil.model_copy(update={"deformable": deformable, "ot": ot})
    torch.manual_seed(0)
    m = build_model("dmsmil", cfg.model_copy(update={"dmsmil": section}), [D_IN, D_IN], 2)
    for attention in m.intra or []:
        attention.formulation = formulation
    return m.train()


def step(m, bags: Bags, y: torch.Tensor) -> float:
    m.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _ = m.loss(m(bags), y)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=200, help="K tiles per scale")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    K = args.tiles
    side = math.ceil(math.sqrt(K))
    cells = torch.arange(K)
    grid = torch.stack([cells % side, cells // side], -1)[None]  # (1, K, 2)
    gen = torch.Generator().manual_seed(0)
    x = tuple(torch.randn(1, K, D_IN, generator=gen) for _ in range(2))
    bags, y = Bags(x, None, (grid, grid)), torch.tensor([1])

    variants = {
        "deformable: false": (False, "gather"),
        "grid_sample (before)": (True, "grid_sample"),
        "gather (now)": (True, "gather"),
    }
    for ot in ("exact", "off"):
        models = {name: model(d, f, ot) for name, (d, f) in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for m in models.values():
            step(m, bags, y)  # warm-up
        for _ in range(args.repeats):
            for name, m in models.items():
                times[name].append(step(m, bags, y))
        before, now = models["grid_sample (before)"], models["gather (now)"]
        logits = (before(bags).logits - now(bags).logits).abs().max().item()
        grad = max(  # sampling_offsets excluded: see KINK
            (a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-12)
            for (name, a), b in zip(before.named_parameters(), now.parameters(), strict=True)
            if b.grad is not None and "sampling_offsets" not in name
        )
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        base = median["deformable: false"]
        print(f"\nDMSMIL step, K={K} per scale, {D_IN}-D, ot: {ot}, {args.threads} thread(s)")
        for name, t in median.items():
            print(f"  {name:22s} {t * 1e3:8.1f} ms   x{t / base:.2f} of deformable: false")
        ratio = median["grid_sample (before)"] / median["gather (now)"]
        print(f"  speed-up of the step, before/now: x{ratio:.2f}")
        print(f"  |logits before - now| max {logits:.1e}; gradients, max relative {grad:.1e}")
    print(KINK)


KINK = """
sampling_offsets' gradient is left out of the comparison: the init puts the points of the
axis-aligned heads exactly on cell boundaries, where bilinear sampling has a kink and the
derivative is one-sided; grid_sample's coordinate round trip lands on either side, the gather
takes the upper cell. Off the boundaries both agree (tests/test_deformable.py)."""


if __name__ == "__main__":
    main()
