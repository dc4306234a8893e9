"""``wsimil init``: a project folder for a real cohort, checked before anything is written.

The label table (one row per slide: slide id, label, optionally patient id) is checked
against the slide folder first; slides are matched by file name without suffix (or by the
full name). Missing slides, slides without a label, empty labels and duplicates are each
listed and nothing is written. Then the project is built in a temporary folder beside the
target and renamed into place:

    params.yaml        the checkout's params.yaml without the synthetic stage, the slide
                       table as tiles.slides_csv and crossval.cohort_csv, the labels
                       declared as crossval.classes
    dvc.yaml           the checkout's stages (the one stage list), synth removed, the
                       cohort's deps on data/slides.csv (and data/slides, when brought
                       under DVC) instead of the synthetic cohort, no deps on wsimil's code
    data/slides.csv    slide_id, path, patient_id, label (and mpp_override, when the
                       label table has that column: µm/px of slides that record none)
    data/slides/       with ``dvc_add``: the slides copied in and tracked by ``dvc add``;
                       otherwise the table names the files in place (e.g. on a mount)
    .dvc/              ``git init`` + ``dvc init``, a default local remote ``dvc-remote/``
    README.md          what to run next
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import yaml

CHECKOUT = Path(__file__).resolve().parents[2]  # the repo whose dvc.yaml/params.yaml we reuse
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".dcm")
CODE_DEPS = ("wsimil/", "requirements.lock")


class InitError(Exception):
    """The cohort cannot be scaffolded; ``problems`` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def cohort_table(
    slides: Path,
    labels_csv: Path,
    *,
    slide_column: str = "slide_id",
    label_column: str = "label",
    patient_column: str | None = None,
) -> pd.DataFrame:
    """slide_id, path (absolute), patient_id, label; every problem listed in an InitError."""
    if not Path(slides).is_dir():
        raise InitError([f"--slides {slides}: not a folder of slide files"])
    try:
        table = pd.read_csv(labels_csv, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InitError([f"{labels_csv}: cannot read the label table ({exc})"]) from None
    wanted = [slide_column, label_column] + ([patient_column] if patient_column else [])
    absent = [c for c in wanted if c not in table.columns]
    if absent:
        raise InitError(
            [
                f"{labels_csv}: no column {', '.join(absent)} (has {', '.join(table.columns)}); "
                "name them with --slide-column, --label-column, --patient-column"
            ]
        )
    files: dict[str, list[Path]] = {}
    for p in sorted(Path(slides).rglob("*")):
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            files.setdefault(p.stem, []).append(p.resolve())
            files.setdefault(p.name, []).append(p.resolve())
    ids = table[slide_column].fillna("").str.strip()
    problems = []
    dup = sorted(ids[ids.duplicated() & (ids != "")].unique())
    if dup:
        problems.append(f"{labels_csv}: slides listed more than once: {_few(dup)}")
    twice = sorted(k for k, v in files.items() if len(v) > 1 and Path(k).suffix == "")
    if twice:
        problems.append(f"{slides}: several files share the name of slide(s) {_few(twice)}")
    missing = sorted(i for i in ids if i and i not in files)
    if missing:
        problems.append(f"{labels_csv}: no file in {slides} for slide(s) {_few(missing)}")
    no_label = table[label_column].fillna("").str.strip() == ""
    if no_label.any():
        problems.append(f"{labels_csv}: empty {label_column} for slide(s) {_few(ids[no_label])}")
    labelled = {files[i][0] for i in ids if i in files}
    stems = {v[0] for k, v in files.items() if Path(k).suffix == ""}
    unlabelled = sorted(p.name for p in stems - labelled)
    if unlabelled:
        problems.append(f"{slides}: slide(s) without a row in {labels_csv}: {_few(unlabelled)}")
    if problems:
        raise InitError(problems)
    out = pd.DataFrame(
        {
            "slide_id": [files[i][0].stem for i in ids],
            "path": [str(files[i][0]) for i in ids],
            "patient_id": (table[patient_column] if patient_column else ids).to_numpy(),
            "label": table[label_column].str.strip().to_numpy(),
        }
    )
    if "mpp_override" in table.columns:  # slides without a recorded resolution
        out["mpp_override"] = table["mpp_override"].to_numpy()
    return out


def _few(items, n: int = 20) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def project_params(classes: list[str], name: str) -> dict:
    """The checkout's params.yaml for a real cohort."""
    params = yaml.safe_load((CHECKOUT / "params.yaml").read_text())
    params.pop("synth", None)
    params["tiles"]["slides_csv"] = "data/slides.csv"
    params["crossval"]["cohort_csv"] = "data/slides.csv"
    params["crossval"]["classes"] = classes
    params["crossval"]["experiment"] = name
    return params


def project_stages(tracked_slides: bool) -> dict:
    """The checkout's dvc.yaml, synth dropped, deps on the cohort's table (and slides)."""
    doc = yaml.safe_load((CHECKOUT / "dvc.yaml").read_text())
    doc["stages"].pop("synth", None)
    cohort = {
        "data/demo": ["data/slides.csv"] + (["data/slides"] if tracked_slides else []),
        "data/demo/slides.csv": ["data/slides.csv"],
    }
    for stage in doc["stages"].values():
        body = stage.get("do", stage)
        deps = []
        for d in body.get("deps", []):
            deps += cohort.get(d, [] if d.startswith(CODE_DEPS) else [d])
        body["deps"] = deps
    return doc


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InitError([f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}"])


def init_project(target: Path, table: pd.DataFrame, *, dvc_add: bool, dvc: str = "dvc") -> Path:
    """Write the project (see the module docstring) at ``target``, which must not exist yet."""
    target = Path(target).resolve()
    if target.exists() and any(target.iterdir()):
        raise InitError([f"{target}: exists and is not empty; give a new folder"])
    tmp = target.with_name(f".{target.name}.{os.getpid()}.init")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "data").mkdir(parents=True)
        rows = table.copy()
        if dvc_add:
            (tmp / "data" / "slides").mkdir()
            for i, p in enumerate(rows["path"]):
                shutil.copy2(p, tmp / "data" / "slides" / Path(p).name)
                rows.loc[i, "path"] = f"slides/{Path(p).name}"
        rows.to_csv(tmp / "data" / "slides.csv", index=False)
        classes = sorted(rows["label"].unique())
        (tmp / "params.yaml").write_text(
            "# wsimil parameters for this cohort; every key is documented in wsimil's params.yaml\n"
            + yaml.safe_dump(project_params(classes, target.name), sort_keys=False)
        )
        (tmp / "dvc.yaml").write_text(yaml.safe_dump(project_stages(dvc_add), sort_keys=False))
        (tmp / ".gitignore").write_text("mlruns/\nmlruns.db\n.prefect/\ndvc-remote/\nreports/\n")
        (tmp / "README.md").write_text(project_readme(target.name, len(rows), classes, dvc_add))
        _run(["git", "init", "-q"], tmp)
        _run([dvc, "init", "-q"], tmp)
        _run([dvc, "remote", "add", "-d", "local", str(target / "dvc-remote")], tmp)
        if dvc_add:
            _run([dvc, "add", "-q", "data/slides"], tmp)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def project_readme(name: str, n: int, classes: list[str], dvc_add: bool) -> str:
    where = (
        "The slides were copied into `data/slides/` and are tracked by DVC (`dvc push` "
        "stores them in the local remote `dvc-remote/`)."
        if dvc_add
        else "`data/slides.csv` names the slides where they are (e.g. on a mount); they "
        "are not copied. Keep the paths stable, or rerun `wsimil init --dvc-add`."
    )
    return f"""# {name}

A wsimil project for {n} slides, labels {", ".join(classes)} (made by `wsimil init`).
{where}

    dvc repro                 # tiles -> features -> splits -> crossval -> tune -> register
    dvc repro crossval        # or stop after cross-validation
    dvc push                  # caches and models to the local remote dvc-remote/

Edit `params.yaml` first: `features.extractor` and `features.weights` (a pretrained
encoder for real results), `tiles.tile_px`/`top_k`, and `crossval.n_folds`. Runs are
tracked in `mlruns.db` here (`mlflow ui --backend-store-uri sqlite:///mlruns.db`).
"""
