"""Ablation grids: the papers' tables on your cohort, as one tracked object (issue 19).

A grid is a list of cells; a cell is a model family plus the params keys it changes. Every
cell is a full cross-validation (:func:`wsimil.experiment.crossval.run_crossval`) on the
same ``splits.json``, so each cell's per-fold metrics pair with the reference cell's.

- Named grids: ``dmsmil``: ``tables`` (the switches of DMSMIL's Tables 4-5, single-scale
  rows as DAMIL) and ``lambda`` (Fig. 3's λ sweep); ``dtfd``: ``distill`` (the four
  distillations × M pseudo-bags). A YAML file or ``ablate.grids`` in params.yaml defines
  others (:class:`wsimil.config.AblateGrid`).
- Output, ``<ablate.out_dir>/<grid>/``: one cross-validation folder per cell,
  ``table.csv`` and ``table.md`` (mean ± std ACC/F1/AUC; Δ against the reference, paired
  over the shared folds, with a two-sided CI: :func:`wsimil.train.metrics.paired_folds`)
  and ``plot.png`` (AUC against the swept value, one line per series, or one bar per cell).
  DTFD-MIL cells also carry ``auc_tier1`` (the pseudo-bag AUC, :func:`wsimil.train.metrics.
  pseudo_bag_auc`): a column of the table and a dashed line per series in the plot.
- MLflow: one parent run per grid (its id is kept in ``parent.json``), each cell's
  cross-validation nested under it, the table and plot logged on it.
- Resume: a cell whose folder holds ``cell.json`` with the same family, keys and
  :func:`fingerprint` (model and train settings, splits, features) and a ``metrics.json``
  is not rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from wsimil.atomic import write_text
from wsimil.config import AblateCell, AblateGrid, ConfigError, Params, with_overrides
from wsimil.experiment.folds import model_scales
from wsimil.experiment.heatmaps import pyplot, save_figure
from wsimil.experiment.tracking import start_top_run
from wsimil.train.metrics import EXTRA_METRICS, METRICS, paired_folds

LAMBDAS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
DISTILLS = ("maxs", "maxmins", "mas", "afs")
PSEUDO_BAGS = (1, 2, 4, 8, 16)


def _cell(name: str, family: str, **values) -> AblateCell:
    return AblateCell(name=name, family=family, **values)


NAMED: dict[str, dict[str, AblateGrid]] = {
    "dmsmil": {
        # Tables 4-5: multi-scale fusion, inter-scale OT and deformable attention on/off.
        "tables": AblateGrid(
            reference="full",
            cells=[
                _cell("damil-10x", "damil", set={"model.scale": "10x"}),
                _cell("damil-20x", "damil", set={"model.scale": "20x"}),
                _cell(
                    "fusion-only",
                    "dmsmil",
                    set={"model.dmsmil.ot": "off", "model.dmsmil.deformable": False},
                ),
                _cell("fusion+ot", "dmsmil", set={"model.dmsmil.deformable": False}),
                _cell("fusion+deformable", "dmsmil", set={"model.dmsmil.ot": "off"}),
                _cell("full", "dmsmil"),
            ],
        ),  # fmt: skip
        # Fig. 3: L = L_ot + λ·L_ce.
        "lambda": AblateGrid(
            reference="lam=1",
            cells=[
                _cell(
                    f"lam={lam:g}", "dmsmil", set={"model.dmsmil.lam": lam}, x=lam, series="dmsmil"
                )
                for lam in LAMBDAS
            ],
        ),  # fmt: skip
    },
    "dtfd": {
        "distill": AblateGrid(
            reference="afs-M4",
            cells=[
                _cell(
                    f"{d}-M{m}",
                    "dtfd",
                    set={"model.dtfd.distill": d, "model.dtfd.n_pseudo_bags": m},
                    x=m,
                    series=d,
                )
                for d in DISTILLS
                for m in PSEUDO_BAGS
            ],
        ),  # fmt: skip
    },
}
DEFAULT = {"dmsmil": "tables", "dtfd": "distill"}


def resolve_grid(params: Params, model: str, grid: str | None) -> tuple[str, AblateGrid]:
    """``(name, grid)`` for ``--grid``: a named grid of ``model``, an ``ablate.grids`` entry,
    or a YAML file (its stem names the output folder).

    Raises:
        ConfigError: an unknown name, or a file that is not a valid grid.
    """
    grid = grid or DEFAULT.get(model)
    named = {**NAMED.get(model, {}), **params.ablate.grids}
    if grid in named:
        return grid, named[grid]
    path = Path(grid or "")
    if grid and path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(f"grid file {path}: not found; give a YAML file or a grid name")
        try:
            return path.stem, AblateGrid.model_validate(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"grid file {path}: not a valid grid ({first})") from None
    raise ConfigError(
        f"no grid '{grid}' for --model {model}; choose one of {', '.join(named) or 'none'}, "
        "add one under ablate.grids in params.yaml, or give a grid YAML file"
    )


def cell_params(params: Params, cell: AblateCell, model: str) -> tuple[str, Params]:
    """The cell's family and its params (the grid's overrides applied and validated)."""
    family = cell.family or model
    try:
        return family, with_overrides(params, {"model.name": family, **cell.set})
    except ConfigError as exc:
        raise ConfigError(f"ablation cell '{cell.name}': {exc}") from None


def fingerprint(params: Params, family: str) -> str:
    """What a finished cell must match to be skipped: its model and train settings, the
    splits file's bytes and the features folder (so ``-S`` overrides and new folds rerun it)."""
    splits = Path(params.crossval.splits_path)
    doc = {
        "model": params.model.model_dump(mode="json"),
        "train": getattr(params.train, family).model_dump(mode="json"),
        "splits_sha256": hashlib.sha256(splits.read_bytes()).hexdigest()
        if splits.is_file()
        else None,
        "features": str(params.features.out_dir),
        "extractor": str(params.features.extractor),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


Runner = Callable[..., object]
RunnerFactory = Callable[[Params, str], Runner]


def run_grid(
    params: Params,
    model: str,
    name: str,
    grid: AblateGrid,
    make_runner: RunnerFactory,
    *,
    say: Callable[[str], None] = lambda m: None,
) -> dict:
    """Cross-validate every cell (skipping finished ones); write and log the table and plot.

    Args:
        make_runner: ``make_runner(params, family)`` gives ``run(params, **kwargs)``, one
            tracked cross-validation (:func:`wsimil.experiment.project.crossval_runner`);
            called once per family and scales, so bags load once per cohort view.

    Returns:
        ``{"out_dir", "parent_run_id", "ran", "skipped", "rows"}``.
    """
    out = Path(params.ablate.out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    cells = [(c, *cell_params(params, c, model)) for c in grid.cells]  # all valid, or none runs
    parent_id = _parent_run(out, params.crossval.experiment, name, model)
    runners: dict[tuple, Runner] = {}
    ran, skipped = [], []
    for cell, family, p in cells:
        folder = out / cell.name
        settings = {"family": family, "set": cell.set, "fingerprint": fingerprint(p, family)}
        if _finished(folder, settings):
            skipped.append(cell.name)
            say(f"{cell.name}: finished, skipped")
            continue
        key = (family, model_scales(family, p.model))
        if key not in runners:
            runners[key] = make_runner(p, family)
        with mlflow.start_run(run_id=parent_id):
            cv = runners[key](p, out_dir=folder, run_name=f"{name}-{cell.name}", n_heatmaps=0)
        mlflow.MlflowClient().set_tag(cv.parent_run_id, "ablate_cell", cell.name)
        _write_json(folder / "cell.json", {**settings, "mlflow_run_id": cv.parent_run_id})
        ran.append(cell.name)
        say(f"{cell.name}: AUC {cv.summary['auc_mean']:.3f} ± {cv.summary['auc_std']:.3f}")
    table = ablation_table(grid, {c.name: _read_metrics(out / c.name) for c in grid.cells},
                           confidence=params.ablate.confidence)  # fmt: skip
    _write_table(table, out, name, grid.reference, params.ablate.confidence)
    plot_grid(grid, table, out / "plot.png", title=f"{model}: {name}")
    client = mlflow.MlflowClient()
    for f in ("table.csv", "table.md", "plot.png"):
        client.log_artifact(parent_id, str(out / f))
    ref = table.set_index("cell").loc[grid.reference]
    client.log_metric(parent_id, "reference_auc_mean", float(ref["auc_mean"]))
    return {"out_dir": out, "parent_run_id": parent_id, "ran": ran, "skipped": skipped,
            "rows": table}  # fmt: skip


def ablation_table(
    grid: AblateGrid, metrics: dict[str, dict], *, confidence: float
) -> pd.DataFrame:
    """One row per cell: mean ± std of each metric, and Δ vs the reference with its CI.

    Δ is paired over the folds both cells were scored on; the interval is two-sided at
    ``confidence`` (each bound one-sided at (1 + confidence) / 2).
    """
    keys = (
        *METRICS,
        *(k for k in EXTRA_METRICS if all(f"{k}_mean" in m for m in metrics.values())),
    )
    ref = _per_fold(metrics[grid.reference], keys)
    rows = []
    for cell in grid.cells:
        m = metrics[cell.name]
        row = {"cell": cell.name, "family": cell.family or "", "series": cell.series or "",
               "x": cell.x if cell.x is not None else math.nan,
               "set": json.dumps(cell.set, sort_keys=True)}  # fmt: skip
        folds = _per_fold(m, keys)
        for k in keys:
            row[f"{k}_mean"], row[f"{k}_std"] = m[f"{k}_mean"], m[f"{k}_std"]
            d, low, high, n = paired_folds(folds[k], ref[k], confidence=(1 + confidence) / 2)
            row[f"d_{k}"], row[f"d_{k}_low"], row[f"d_{k}_high"] = d, low, high
        row["n_folds"] = n
        rows.append(row)
    return pd.DataFrame(rows)


def _per_fold(metrics: dict, keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """``{"auc": {0: 0.91, 1: 0.88}, ...}`` from a crossval metrics.json."""
    folds = {int(k.removeprefix("fold")): v for k, v in metrics["folds"].items()}
    return {k: {f: float(v[k]) for f, v in folds.items()} for k in keys}


def _write_table(table: pd.DataFrame, out: Path, name: str, ref_name: str, confidence: float):
    write_text(out / "table.csv", table.to_csv(index=False, float_format="%.6g"))
    pct = f"{confidence:.0%}"
    tier1 = "auc_tier1_mean" in table.columns  # DTFD-MIL: the pseudo-bag AUC beside the slide's
    shown = (*METRICS, "auc_tier1") if tier1 else METRICS
    lines = [
        f"| cell | ACC | F1 | AUC |{' tier-1 AUC |' if tier1 else ''} "
        f"ΔAUC vs {ref_name} [{pct} CI] | ΔACC [{pct} CI] |",
        "|---|---|---|---|" + ("---|" if tier1 else "") + "---|---|",
    ]
    for r in table.itertuples():
        ms = [f"{getattr(r, f'{k}_mean'):.3f} ± {getattr(r, f'{k}_std'):.3f}" for k in shown]
        ds = [_ci(getattr(r, f"d_{k}"), getattr(r, f"d_{k}_low"), getattr(r, f"d_{k}_high"))
              for k in ("auc", "acc")]  # fmt: skip
        lines.append(f"| {r.cell} | {' | '.join(ms)} | {' | '.join(ds)} |")
    n = int(table["n_folds"].max())
    lines += ["", f"Grid `{name}`: mean ± std over {n} shared folds; Δ = cell − reference, "
              "paired per fold (Nadeau-Bengio corrected t)."]  # fmt: skip
    if tier1:
        lines.append("AUC is tier 2 (the slide); tier-1 AUC scores every pseudo-bag against "
                     "its slide's label.")  # fmt: skip
    write_text(out / "table.md", "\n".join(lines) + "\n")


def _ci(d: float, low: float, high: float) -> str:
    if not math.isfinite(low):
        return f"{d:+.3f} [n/a]" if math.isfinite(d) else "n/a"
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def plot_grid(grid: AblateGrid, table: pd.DataFrame, path: Path, *, title: str) -> None:
    """AUC (mean ± std) against the swept value, one line per series; else one bar per cell.

    A DTFD-MIL grid also draws each series' tier-1 (pseudo-bag) AUC, dashed, in its colour.
    """
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    swept = table["x"].notna().all()
    if swept:
        for series, rows in table.groupby("series", sort=False):
            rows = rows.sort_values("x")
            line = ax.errorbar(rows["x"], rows["auc_mean"], yerr=rows["auc_std"], marker="o",
                               capsize=3, label=series or None)  # fmt: skip
            if "auc_tier1_mean" in rows:
                ax.errorbar(rows["x"], rows["auc_tier1_mean"], yerr=rows["auc_tier1_std"],
                            marker="s", capsize=3, ls="--", color=line.lines[0].get_color(),
                            label=f"{series} tier 1")  # fmt: skip
        if table["x"].min() > 0 and table["x"].max() / table["x"].min() >= 50:
            ax.set_xscale("log")
        ax.set_xlabel("swept value")
        if table["series"].nunique() > 1 or "auc_tier1_mean" in table:
            ax.legend(fontsize=8)
    else:
        y = np.arange(len(table))
        ax.barh(y, table["auc_mean"], xerr=table["auc_std"], capsize=3)
        ax.set_yticks(y, table["cell"])
        ax.set_xlabel("test AUC (mean ± std over folds)")
    if swept:
        ax.set_ylabel("test AUC (mean ± std over folds)")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def _parent_run(out: Path, experiment: str, name: str, model: str) -> str:
    """The grid's MLflow parent run: the one ``parent.json`` names if it still exists."""
    doc = out / "parent.json"
    if doc.is_file():
        run_id = json.loads(doc.read_text())["mlflow_run_id"]
        try:
            mlflow.MlflowClient().get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # another tracking store: start a new parent
    with start_top_run(experiment, f"ablate-{model}-{name}") as run:
        mlflow.set_tags({"run_kind": "ablation", "ablate_grid": name, "model_family": model})
    _write_json(doc, {"mlflow_run_id": run.info.run_id, "grid": name, "model": model})
    return run.info.run_id


def _finished(folder: Path, settings: dict) -> bool:
    doc = folder / "cell.json"
    if not (doc.is_file() and (folder / "metrics.json").is_file()):
        return False
    recorded = json.loads(doc.read_text())
    return {k: recorded.get(k) for k in settings} == json.loads(json.dumps(settings))


def _read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _write_json(path: Path, doc: dict) -> None:
    write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
