"""Per-lesion AUC of every ablation cell on the two-scale cohort (synth.twoscale).

For each cell's pooled test predictions (``<cell>/report/predictions.csv``), the AUC of
the tumour probability for the ``fine`` (20x-only) positives against the normal slides,
and for the ``architecture`` (10x-only) positives against them. A single-scale model
that cannot see a lesion scores it near 0.5.

    python lesions.py results/ablate [data/demo/slides.csv]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score


def lesion_aucs(predictions: pd.DataFrame, slides: pd.DataFrame) -> dict[str, float]:
    p = predictions.merge(slides[["slide_id", "lesion"]], on="slide_id")
    p["lesion"] = p["lesion"].fillna("")
    normal = p[p["lesion"] == ""]
    out = {}
    for lesion in ("fine", "architecture"):
        pos = p[p["lesion"] == lesion]
        both = pd.concat([normal, pos])
        out[f"auc_{lesion}"] = roc_auc_score(both["lesion"] == lesion, both["p_tumour"])
    return out


def main(root: Path, slides_csv: Path) -> None:
    slides = pd.read_csv(slides_csv, keep_default_na=False)
    rows = []
    for preds in sorted(root.glob("*/*/report/predictions.csv")):
        grid, cell = preds.parts[-4], preds.parts[-3]
        rows.append({"grid": grid, "cell": cell, **lesion_aucs(pd.read_csv(preds), slides)})
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    table.to_csv(root / "lesion_auc.csv", index=False, float_format="%.4f")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "data/demo/slides.csv"))
