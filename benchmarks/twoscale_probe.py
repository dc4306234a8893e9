"""Is each lesion of the two-scale cohort (synth.twoscale) visible at one scale only?

A tile-level linear probe, no MIL: for each lesion type and scale, a logistic regression
on the cached features separates the tiles inside that lesion (10x tile and its 20x child
both at least half lesion, by the tumour mask) from the tiles of normal slides. Its AUC is
cross-validated with the slides as groups (3 folds), so a probe never scores a slide it
was fitted on. Near 0.5: the scale's features do not show the lesion.

    python benchmarks/twoscale_probe.py            # in the project: params.yaml, data/
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsimil.config import load_params
from wsimil.experiment.heatmaps import tile_tumour_share
from wsimil.extract.cache import features_dir, read_pair


def tiles(params) -> pd.DataFrame:
    """One row per (slide, 10x tile): lesion, share of lesion at 10x and 20x, both features."""
    csv = Path(params.crossval.cohort_csv)
    slides = pd.read_csv(csv, keep_default_na=False)
    root = features_dir(Path(params.features.out_dir), params.features.extractor)
    rows = []
    for s in slides.itertuples():
        b10, b20 = read_pair(root, s.slide_id)
        mask = np.asarray(Image.open(csv.parent / s.mask_path)) > 0
        share10 = tile_tumour_share(b10.coords, b10.tile_size_level0, mask, s.mask_downsample)
        share20 = tile_tumour_share(b20.coords, b20.tile_size_level0, mask, s.mask_downsample)
        for i, j in enumerate(b20.parent_index):
            rows.append({"slide_id": s.slide_id, "lesion": s.lesion, "share10": share10[j],
                         "share20": share20[i], "f10": b10.features[j],
                         "f20": b20.features[i]})  # fmt: skip
    return pd.DataFrame(rows)


def probe(t: pd.DataFrame, lesion: str, scale: str) -> tuple[float, int, int]:
    pos = t[(t["lesion"] == lesion) & (t["share10"] >= 0.5) & (t["share20"] >= 0.5)]
    neg = t[t["lesion"] == ""]
    both = pd.concat([pos, neg])
    x, y = np.stack(both[f"f{scale}"]), (both["lesion"] == lesion).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    p = cross_val_predict(model, x, y, groups=both["slide_id"], cv=GroupKFold(3),
                          method="predict_proba")[:, 1]  # fmt: skip
    return float(roc_auc_score(y, p)), len(pos), len(neg)


def main() -> None:
    params = load_params(Path(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))
    t = tiles(params)
    print("| lesion | lesion tiles | normal tiles | probe AUC at 10x | probe AUC at 20x |")
    print("|---|---|---|---|---|")
    for lesion in ("fine", "architecture"):
        (a10, n_pos, n_neg), (a20, _, _) = probe(t, lesion, "10"), probe(t, lesion, "20")
        print(f"| {lesion} | {n_pos} | {n_neg} | {a10:.3f} | {a20:.3f} |")


if __name__ == "__main__":
    from wsimil import cpu_isa

    cpu_isa.pin()  # the kernels the pipeline computes with (wsimil/cpu_isa.py)
    main()
