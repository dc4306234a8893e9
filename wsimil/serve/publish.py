"""``wsimil register``: publish a project's tuned fold ensemble of one family.

The source is the best tuning trial's models folder, ``<registry.source_dir>/<family>/best/
models``; its manifest is read once, here, and handed to :func:`wsimil.serve.registry.register`
with the extraction settings recorded in the feature caches, the project's lineage and the
tuning trial's tags. The registration record is written to ``<registry.out_dir>/<family>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from wsimil.config import Params
from wsimil.experiment.tracking import dvc_out_hash, git_state
from wsimil.extract.cache import features_dir
from wsimil.extract.replay import ExtractionError, recorded_extraction
from wsimil.serve.registry import register
from wsimil.train.manifest import Manifest


def register_tuned(
    params: Params, root: Path, family: str, *, warn: Callable[[str], None]
) -> tuple[dict, Path]:
    """Register ``<name_prefix><family>`` from the tuned models; gate its champion alias.

    Args:
        params: the project's params, paths absolute (:meth:`wsimil.config.Params.under`).
        root: the project root (git state, ``dvc.lock``).
        warn: told when the model is registered without extraction settings.

    Returns:
        The registration record (:func:`wsimil.serve.registry.register`) and its file.

    Raises:
        EnsembleError: no usable manifest in the source folder.
        ExtractionError: the feature caches do not agree on how they were made (and
            ``registry.include_extractor`` asks for slide input).
        RegistryError: anything else that stops the registration.
    """
    cfg = params.registry
    source = cfg.source_dir / family
    manifest = Manifest.read(source / "best" / "models")
    feats = features_dir(params.features.out_dir, params.features.extractor)
    try:
        extraction = recorded_extraction(feats, manifest.scales)
    except ExtractionError as exc:
        if cfg.include_extractor:
            raise
        warn(f"{exc}; registering without extraction settings")
        extraction = None
    record = register(
        manifest,
        f"{cfg.name_prefix}{family}",
        experiment=params.crossval.experiment,
        extraction=extraction,
        serve_config=params.serve.model_dump(mode="json"),
        champion_margin=cfg.champion_margin,
        champion_gate=cfg.champion_gate,
        lineage={**git_state(root), "data_version": dvc_out_hash(root, params.features.out_dir)},
        carry_extractor=cfg.include_extractor,
        extra_tags=registry_tags(source / "best.json", params.crossval.splits_path),
    )
    out = cfg.out_dir / f"{family}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record, out


def registry_tags(best_json: Path, splits_path: Path) -> dict[str, str]:
    """Version tags from the tuning result and the folds: trial, study, slide count."""
    tags = {}
    if best_json.is_file():
        best = json.loads(best_json.read_text())
        tags.update(
            {
                "tune_study": str(best.get("study_name")),
                "tune_trial": str(best.get("trial_number")),
                "tune_trial_run_id": str(best.get("mlflow_run_id")),
            }
        )
    if splits_path.is_file():
        folds = json.loads(splits_path.read_text()).get("folds", [])
        tags["n_slides"] = str(len({s for f in folds for s in f.get("test", [])}))
    return tags
