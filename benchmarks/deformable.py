"""DMSMIL's deformable attention: its cost in a training step, and where it goes.

    python benchmarks/deformable.py [--tiles 200] [--repeats 15] [--threads 1]
                                    [--before REV] [--profile]

One DMSMIL training step (forward, the model's loss, backward) on one slide of K tiles per
scale, 2048-D features, the params.yaml defaults, with:
- ``deformable: false`` (the plain per-scale projection the attention follows);
- ``matmuls only``: the attention's matrix products and nothing else (the value and output
  d x d projections and the offset/point-weight heads through W_q, forward and backward; no
  sampling). Not the model: the floor any exact implementation of these maths pays on CPU;
- the attention written with ``F.grid_sample`` (``forward_grid_sample``, the transcription
  of Eq. 3-8 the gather is tested against);
- with ``--before REV``, the attention as ``wsimil/models/deformable.py`` was at git
  revision REV (before/after in one run);
- the attention as the model runs it now (``forward``).
Each with ``ot: exact`` (the default) and ``ot: off``. The variants run interleaved, so a
load change on a shared machine hits them alike, and each step is timed in CPU time of this
process (with one thread, the step's own compute; other jobs on the machine do not count).
The median of ``--repeats`` steps is printed, with the ratios to ``deformable: false`` and
the largest logit and gradient difference between grid_sample and now. ``--profile`` adds,
per variant, the step's CPU time per operator (forward and backward, ``torch.profiler``),
summed into matrix products, the fused gather and the rest. No timing asserts: this only
measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from wsimil.config import ModelConfig
from wsimil.models import Bags, build_model
from wsimil.models.deformable import DeformableGridAttention, DeformableOutput

D_IN = 2048
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmv", "aten::mv"}
GATHER = {
    "aten::embedding_bag",
    "aten::_embedding_bag",
    "aten::_embedding_bag_backward",
    "aten::_embedding_bag_dense_backward",
    "aten::_embedding_bag_per_sample_weights_backward",
    "aten::sort",  # inside the gather's backward
    "aten::grid_sampler_2d",
    "aten::grid_sampler_2d_backward",
}


class MatmulsOnly(DeformableGridAttention):
    """The attention's matrix products alone, with the module's weights (a cost floor)."""

    def forward(self, x, grid, mask, grid_hw=None) -> DeformableOutput:
        heads_w = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
        heads_b = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])
        heads = F.linear(x, heads_w @ self.query.weight, heads_b)  # (B, N, 3MU)
        out = self.output(self.value(x)) + heads.mean(-1, keepdim=True)
        return DeformableOutput(out, heads, heads)


def module_at(rev: str):
    """``wsimil/models/deformable.py`` at git revision ``rev``, imported under its own name."""
    path = "wsimil/models/deformable.py"
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True
        ).stdout
    except subprocess.CalledProcessError as err:
        sys.exit(f"--before {rev}: git cannot show {path} there ({err.stderr.decode().strip()})")
    folder = Path(tempfile.mkdtemp(prefix="deformable-before-"))
    (folder / "deformable_before.py").write_bytes(source)
    spec = importlib.util.spec_from_file_location(
        "deformable_before", folder / "deformable_before.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module.DeformableGridAttention


def model(deformable: bool, ot: str, attention=None, formulation: str = "gather"):
    """The DMSMIL of the defaults; ``attention`` swaps in another class with the same weights."""
    cfg = ModelConfig()
    section = cfg.dmsmil.model_copy(update={"deformable": deformable, "ot": ot})
    torch.manual_seed(0)
    m = build_model("dmsmil", cfg.model_copy(update={"dmsmil": section}), [D_IN, D_IN], 2)
    for s, module in enumerate(m.intra or []):
        if attention is not None:
            swapped = attention(section.dim, section.heads, section.points, section.offset_scale)
            swapped.load_state_dict(module.state_dict())
            m.intra[s] = module = swapped
        module.formulation = formulation
    return m.train()


def step(m, bags: Bags, y: torch.Tensor) -> float:
    m.zero_grad(set_to_none=True)
    start = time.process_time()
    loss, _ = m.loss(m(bags), y)
    loss.backward()
    return time.process_time() - start


def per_op(m, bags: Bags, y: torch.Tensor, steps: int = 5) -> list[tuple[str, float]]:
    """(operator, ms of self CPU time per step), largest first, forward and backward."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(m, bags, y)
    ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    return sorted(ops, key=lambda kv: -kv[1])


def print_profile(name: str, ops: list[tuple[str, float]], top: int = 14) -> None:
    total = sum(ms for _, ms in ops)
    matmul = sum(ms for op, ms in ops if op in MATMUL)
    gather = sum(ms for op, ms in ops if op in GATHER)
    print(f"\n  {name}: {total:.1f} ms of operators per step (under the profiler)")
    print(f"    matrix products {matmul:6.1f} ms   sampling/gather {gather:6.1f} ms   ", end="")
    print(f"everything else {total - matmul - gather:6.1f} ms")
    for op, ms in ops[:top]:
        print(f"    {op:52s} {ms:7.2f} ms  {100 * ms / total:4.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=200, help="K tiles per scale")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", metavar="REV", help="also time the attention at git REV")
    parser.add_argument("--profile", action="store_true", help="CPU time per operator")
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
        "deformable: false": dict(deformable=False),
        "matmuls only (floor)": dict(deformable=True, attention=MatmulsOnly),
        "grid_sample": dict(deformable=True, formulation="grid_sample"),
    }
    if args.before:
        variants[f"gather at {args.before}"] = dict(
            deformable=True, attention=module_at(args.before)
        )
    variants["gather (now)"] = dict(deformable=True)
    for ot in ("exact", "off"):
        models = {name: model(ot=ot, **kw) for name, kw in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for m in models.values():
            step(m, bags, y)  # warm-up
        for _ in range(args.repeats):
            for name, m in models.items():
                times[name].append(step(m, bags, y))
        reference, now = models["grid_sample"], models["gather (now)"]
        logits = (reference(bags).logits - now(bags).logits).abs().max().item()
        grad = max(  # sampling_offsets excluded: see KINK
            (a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-12)
            for (name, a), b in zip(reference.named_parameters(), now.parameters(), strict=True)
            if b.grad is not None and "sampling_offsets" not in name
        )
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        base = median["deformable: false"]
        print(f"\nDMSMIL step, K={K} per scale, {D_IN}-D, ot: {ot}, {args.threads} thread(s)")
        for name, t in median.items():
            print(f"  {name:24s} {t * 1e3:8.1f} ms   x{t / base:.2f} of deformable: false")
        if args.before:
            ratio = median[f"gather at {args.before}"] / median["gather (now)"]
            print(f"  speed-up of the step, {args.before}/now: x{ratio:.2f}")
        print(f"  |logits grid_sample - now| max {logits:.1e}; gradients, max relative {grad:.1e}")
        if args.profile:
            for name in ("deformable: false", "matmuls only (floor)", "gather (now)"):
                print_profile(name, per_op(models[name], bags, y))
    print(KINK)


KINK = """
sampling_offsets' gradient is left out of the comparison: the init puts the points of the
axis-aligned heads exactly on cell boundaries, where bilinear sampling has a kink and the
derivative is one-sided; grid_sample's coordinate round trip lands on either side, the gather
takes the upper cell. Off the boundaries both agree (tests/test_deformable.py)."""


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
