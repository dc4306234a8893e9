"""``ot: sinkhorn`` against exact OT at the paper's K: time and error.

    python benchmarks/sinkhorn.py [--tiles 200] [--reg 0.1] [--repeats 3]

The OT term of one slide as DMSMIL computes it (``wsimil.models.transport.wasserstein1``,
forward and backward): W₁ between K and K embeddings of 512-D (ReLU of a random 2048->512
projection of Gaussian features, the scale DMSMIL's projected tiles have), exact
(``ot.emd2``) and entropic (``ot.sinkhorn2``, log domain, POT's default budget and
tolerance). Prints the best of ``--repeats`` times and the relative error against
``ot.emd2``. This is why ``ot: sinkhorn`` is not in the default tuning space (params.yaml).
"""

from __future__ import annotations

import argparse
import time

import torch

from wsimil.models.transport import wasserstein1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--reg", type=float, default=0.1, help="model.dmsmil.sinkhorn_reg")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    project = torch.randn(2048, 512, generator=gen) / 2048**0.5
    p = torch.relu(torch.randn(args.tiles, 2048, generator=gen) @ project).requires_grad_(True)
    q = torch.relu(torch.randn(args.tiles, 2048, generator=gen) @ project)
    result = {}
    for method in ("exact", "sinkhorn"):
        times = []
        for _ in range(args.repeats):
            p.grad = None
            start = time.perf_counter()
            value = wasserstein1(p, q, method=method, reg=args.reg)
            value.backward()
            times.append(time.perf_counter() - start)
        result[method] = (float(value.detach()), min(times))
    (exact, t_exact), (soft, t_soft) = result["exact"], result["sinkhorn"]
    print(f"OT term, K={args.tiles} x {args.tiles}, 512-D, forward+backward, 1 thread")
    print(f"  exact    (ot.emd2)     W1 {exact:.5f}   {t_exact * 1e3:9.1f} ms")
    print(f"  sinkhorn (reg {args.reg:g})   W1 {soft:.5f}   {t_soft * 1e3:9.1f} ms")
    print(f"  sinkhorn / exact: time x{t_soft / t_exact:.1f}, error {(soft - exact) / exact:+.2%}")
    print(f"  mean ground cost {float(torch.cdist(p, q).mean().detach()):.2f} (reg is absolute)")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
