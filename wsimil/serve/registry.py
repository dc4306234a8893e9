"""Publish a tuned fold ensemble to the MLflow model registry.

``wsimil register --model <family>`` takes ``results/tune/<family>/best/models`` (the fold
models of the best Optuna trial) and

1. assembles the bundle the served model reads (:mod:`wsimil.serve.pyfunc`): the fold state dicts
   (safetensors), ``ensemble.json``, the recorded extraction settings and, for slide-path
   input, the extractor's weights (converted to safetensors unless they are TorchScript);
2. logs it as a pyfunc *model from code* (``wsimil/serve/entry.py``; MLflow 3's default
   ``torch.export`` route fails on POT's data-dependent code, and nothing here is pickled)
   with the package as ``code_paths``, requirements pinned from ``requirements.lock``, a
   signature, an input example and the serve settings as model config; loads it back and
   checks that it answers its own input example before registering anything;
3. registers it as ``<prefix><family>``: version tags (CV metrics, data version, git commit,
   extractor), a model card as the description, alias ``challenger`` on every new version
   and alias ``champion`` only when the champion gate (:mod:`wsimil.serve.champion_gate`) finds it
   better, paired on the same test folds, at the stated confidence. The evidence travels
   with each version: its cross-validation's pooled test predictions
   (``report/predictions.csv`` beside ``models/``) are logged on the register run under
   ``evidence/`` (tag ``test_predictions``, with ``test_folds_sha256`` naming the folds they
   were scored on), and the verdict is recorded as ``champion_gate_*`` tags and in the card.

Aliases are read with ``get_registered_model(name).aliases``: registry *search* results
come back without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from wsimil.config import ChampionGateConfig, ServeConfig
from wsimil.experiment.tracking import start_top_run
from wsimil.serve.champion_gate import Evidence, EvidenceError, Verdict, decide
from wsimil.serve.model_card import model_card
from wsimil.serve.pyfunc import BUNDLE, example_request, request_signature
from wsimil.train.manifest import Manifest

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # wsimil/
ENTRY = PACKAGE_DIR / "serve" / "entry.py"
LOCK = PACKAGE_DIR.parent / "requirements.lock"  # the checkout's, beside the package
# Every third-party distribution the served code imports (tests/test_registry.py checks the
# list against the imports), pinned from requirements.lock at registration.
SERVING_PACKAGES = (
    "mlflow", "mlflow-skinny", "mlflow-tracing", "torch", "torchvision", "timm",
    "huggingface-hub", "numpy", "pandas", "safetensors", "pydantic", "pyyaml", "pot", "h5py",
    "pillow", "openslide-python", "openslide-bin", "tqdm",
    "fastapi",  # serve/limits.py guards the scoring server's app
    "opencv-python-headless",  # the tissue rule's mask, replayed for a slide path
    "transformers", "torchstain",  # the Phikon-v2 recipe; stain normalisation's code
)  # fmt: skip
METRIC_TAGS = ("auc_mean", "auc_std", "acc_mean", "acc_std", "f1_mean", "f1_std")
PREDICTIONS = Path("report") / "predictions.csv"  # beside models/, as crossval writes them


class RegistryError(Exception):
    """Something that stops a registration; the message says what to fix."""


# --- what the model carries -----------------------------------------------------------------


def serving_requirements(
    lock: Path = LOCK, packages: tuple[str, ...] = SERVING_PACKAGES
) -> list[str]:
    """``name==version`` for each package, the versions taken from ``lock``.

    The default lock is the one of the checkout wsimil runs from (a project folder need not
    hold one); an installed copy without a checkout pins what is installed.
    """
    if lock == LOCK and not lock.exists():
        from importlib.metadata import version

        return [f"{p}=={version(p)}" for p in packages]
    pins = {}
    for line in Path(lock).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[canonical_name(m.group(1))] = m.group(2)
    missing = [p for p in packages if canonical_name(p) not in pins]
    if missing:
        raise RegistryError(f"{lock}: no pin for {', '.join(missing)}; run `make lock`")
    return [f"{p}=={pins[canonical_name(p)]}" for p in packages]


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_bundle(
    models: Manifest | Path, extraction: dict | None, dest: Path, *, carry: bool
) -> Path:
    """Write the served model's files to ``dest`` (layout in :mod:`wsimil.serve.pyfunc`).

    Args:
        models: a cross-validation ``models/`` folder, or its manifest already read.
        extraction: the recorded extraction settings (None: features-only model).
        carry: ship the extractor's weights, so that the model accepts slide paths.
    """
    manifest = Manifest.of(models)
    (dest / "models").mkdir(parents=True)
    shutil.copy2(manifest.path, dest / "models" / manifest.path.name)
    for fold in manifest.folds:
        src = manifest.fold_path(fold)
        shutil.copy2(src, dest / "models" / src.name)
    if extraction is not None:
        record = {k: v for k, v in extraction.items() if k != "weights_path"}  # this machine's
        if extraction["weights"] != "random":
            record["weights_file"] = None
            if carry:
                src = Path(str(extraction.get("weights_path") or ""))
                record.update(carry_weights(src, str(extraction["weights_sha256"]), dest))
        (dest / "extraction.json").write_text(json.dumps(record, indent=1, default=str))
    return dest


def carry_weights(src: Path, sha256: str, dest: Path) -> dict:
    """Copy the extractor's weight file into ``dest/extractor``, as safetensors.

    State dicts saved with ``torch.save`` are re-saved as safetensors (read with
    ``weights_only=True``); safetensors and TorchScript files are copied.

    Returns:
        ``weights_file`` (relative to ``dest``) and ``weights_file_sha256``.
    """
    from wsimil.extract.extractor_files import is_torchscript as _is_torchscript
    from wsimil.extract.extractor_files import load_state_dict, sha256_file

    if not src.is_file():
        raise RegistryError(
            f"the extractor weights {src} recorded in the feature caches are not on this "
            "machine; restore them, or set registry.include_extractor: false (the model then "
            "accepts features only)"
        )
    if sha256_file(src) != sha256:
        raise RegistryError(
            f"{src} changed since the features were made (SHA-256 differs); re-run "
            "`wsimil features` or restore the file"
        )
    (dest / "extractor").mkdir()
    if src.suffix == ".safetensors" or _is_torchscript(src):
        out = dest / "extractor" / src.name
        shutil.copy2(src, out)
    else:
        from safetensors.torch import save_file

        out = dest / "extractor" / f"{src.stem}.safetensors"
        state = {k: v.contiguous().clone() for k, v in load_state_dict(src).items()}
        save_file(state, str(out))
    return {"weights_file": str(out.relative_to(dest)), "weights_file_sha256": sha256_file(out)}


def copy_package(dest: Path) -> Path:
    """The wsimil package, without caches, for ``code_paths``."""
    out = dest / "wsimil"
    shutil.copytree(PACKAGE_DIR, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


# --- logging and registering ----------------------------------------------------------------


def log_ensemble(
    manifest: Manifest,
    *,
    extraction: dict | None,
    serve_config: dict,
    requirements: list[str],
    carry_extractor: bool,
) -> mlflow.models.model.ModelInfo:
    """Log the fold ensemble as a pyfunc model in the active run; check it answers.

    Raises:
        RegistryError: the logged model cannot answer its own input example.
    """
    scales = manifest.scales
    example = example_request(scales, manifest.in_dims)
    with tempfile.TemporaryDirectory(prefix="wsimil-register-") as tmp:
        bundle = make_bundle(manifest, extraction, Path(tmp) / "bundle", carry=carry_extractor)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY),
            artifacts={BUNDLE: str(bundle)},
            code_paths=[str(copy_package(Path(tmp) / "code"))],
            pip_requirements=requirements,
            signature=request_signature(scales, serve_config.get("top_instances", 10)),
            input_example=example,
            model_config=serve_config,
        )
    try:
        answer = mlflow.pyfunc.load_model(info.model_uri).predict(example)
    except Exception as exc:
        raise RegistryError(f"the logged model {info.model_uri} cannot answer: {exc}") from exc
    if not (len(answer) == 1 and set(answer[0]["probabilities"]) == set(manifest.classes)):
        raise RegistryError(f"the logged model {info.model_uri} answered {answer!r}")
    return info


# --- the evidence the champion gate reads ---------------------------------------------------


def cv_evidence(manifest: Manifest) -> Evidence | None:
    """The pooled test predictions of the cross-validation the manifest's folder came from.

    Returns:
        None when the folder beside ``models/`` holds no ``report/predictions.csv``.

    Raises:
        RegistryError: the predictions do not reproduce the manifest's folds and CV AUC
            (they belong to another run).
    """
    path = Path(manifest.models_dir).parent / PREDICTIONS
    if not path.is_file():
        return None
    try:
        evidence = Evidence.read(path, list(manifest.classes))
    except EvidenceError as exc:
        raise RegistryError(str(exc)) from None
    aucs = evidence.fold_aucs()
    finite = [a for a in aucs.values() if math.isfinite(a)]
    scored = float(np.mean(finite)) if finite else math.nan
    recorded = float(manifest.cv.get("auc_mean", math.nan))
    same_auc = math.isclose(scored, recorded, abs_tol=1e-6) or (
        math.isnan(scored) and math.isnan(recorded)
    )
    if sorted(aucs) != sorted(manifest.folds) or not same_auc:
        raise RegistryError(
            f"{path} (folds {sorted(aucs)}, mean fold AUC {scored:.4f}) does not match "
            f"{manifest.path} (folds {list(manifest.folds)}, CV AUC "
            f"{recorded:.4f}): they come from different runs; re-run `wsimil tune`"
        )
    return evidence


def version_evidence(client: MlflowClient, name: str, version: str) -> Evidence | None:
    """The test predictions a registered version carries (None: it has none, or they are gone)."""
    tags = client.get_model_version(name, version).tags
    if not tags.get("test_predictions"):
        return None
    with tempfile.TemporaryDirectory(prefix="wsimil-gate-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(tags["test_predictions"], dst_path=tmp)
            return Evidence.read(Path(path), tags["classes"].split(","))
        except (mlflow.exceptions.MlflowException, OSError, EvidenceError):
            return None


def version_tags(doc: Manifest, lineage: dict[str, str], extraction: dict | None) -> dict[str, str]:
    """Tags of a model version: CV metrics, lineage and what it needs as input."""
    cv = doc.cv
    tags = {f"cv_{k}": f"{float(cv[k]):.6f}" for k in METRIC_TAGS if k in cv}
    tags.update(lineage)
    tags.update(
        {
            "family": doc.family,
            "classes": ",".join(doc.classes),
            "scales": ",".join(doc.scales),
            "in_dims": ",".join(str(d) for d in doc.in_dims),
            "n_folds": str(len(doc.folds)),
            "threshold_rule": "mean of the fold thresholds chosen on validation",
            "source_run_id": str(doc.parent_run_id or ""),
        }
    )
    if extraction is not None:
        tags["extractor"] = str(extraction["extractor"])
        tags["extractor_weights"] = str(extraction["weights"])
        tags["extractor_weights_sha256"] = str(extraction["weights_sha256"]) or "none"
        tags["extractor_dim"] = str(extraction.get("feature_dim", "unknown"))
        tags["stain_norm"] = str(extraction.get("stain_norm") or "none")
    return tags


def source_lineage(client: MlflowClient, run_id: str | None) -> dict[str, str]:
    """data_version, git commit and extractor recorded on the cross-validation run."""
    if not run_id:
        return {}
    try:
        tags = client.get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException:
        return {}
    keys = ("data_version", "git_commit", "git_dirty", "extractor", "cohort", "features_dir")
    return {k: tags[k] for k in keys if k in tags}


def register(
    models: Manifest | Path,
    name: str,
    *,
    experiment: str,
    extraction: dict | None,
    champion_margin: float,
    lineage: dict[str, str],
    champion_gate: ChampionGateConfig | None = None,
    serve_config: dict | None = None,
    requirements: list[str] | None = None,
    carry_extractor: bool = True,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """Log, register and gate one fold ensemble (see the module docstring).

    Args:
        models: a cross-validation ``models/`` folder, or its manifest already read.
        champion_margin: the minimum AUC gain over the champion (``registry.champion_margin``).
        champion_gate: how sure the gain must be (default: ``registry.champion_gate``'s
            defaults).
        serve_config: the params.yaml ``serve`` section (default: its defaults).
        requirements: pins for the served environment (default: ``serving_requirements()``).
        lineage: fallback tags (current git state, data version) for what the source run
            does not record.
        extra_tags: more version tags (e.g. the tuning trial).

    Returns:
        The registration record (name, version, aliases, whether champion moved and why).
    """
    doc = Manifest.of(models)
    client = MlflowClient()
    evidence = cv_evidence(doc)
    with start_top_run(experiment, f"register-{name}") as run:
        info = log_ensemble(
            doc,
            extraction=extraction,
            serve_config=serve_config or ServeConfig().model_dump(mode="json"),
            requirements=requirements or serving_requirements(),
            carry_extractor=carry_extractor,
        )
        tags = version_tags(
            doc, {**lineage, **source_lineage(client, doc.parent_run_id)}, extraction
        )
        tags.update(extra_tags or {})
        if evidence is not None:
            mlflow.log_artifact(str(doc.models_dir.parent / PREDICTIONS), "evidence")
            tags["test_predictions"] = f"runs:/{run.info.run_id}/evidence/{PREDICTIONS.name}"
            tags["test_folds_sha256"] = evidence.folds_sha256
        mlflow.set_tags({**tags, "run_kind": "register", "registered_model": name})
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
    new_auc = float(doc.cv.get("auc_mean", math.nan))
    gate = champion_gate or ChampionGateConfig()
    verdict, current, champion_auc = challenge(
        client, name, evidence, new_auc, gate, champion_margin
    )
    for key, value in verdict.tags().items():
        client.set_model_version_tag(name, version, key, value)
    tags.update(verdict.tags())
    client.update_model_version(name, version, description=model_card(name, doc, tags))
    client.set_registered_model_alias(name, "challenger", version)
    if verdict.moved:
        client.set_registered_model_alias(name, "champion", version)
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name, f"wsimil {doc.family} fold ensemble; each version's description is its card."
        )
    return {
        "name": name,
        "version": str(version),
        "model_uri": f"models:/{name}/{version}",
        "run_id": run.info.run_id,
        "cv_auc_mean": new_auc,
        "champion": {
            "moved": verdict.moved,
            "previous": current,
            "previous_cv_auc_mean": champion_auc,
            "margin": champion_margin,
            **gate_record(verdict),
        },
        "aliases": dict(client.get_registered_model(name).aliases),
    }


def challenge(
    client: MlflowClient,
    name: str,
    evidence: Evidence | None,
    new_auc: float,
    gate: ChampionGateConfig,
    margin: float,
) -> tuple[Verdict, int | None, float | None]:
    """The gate's verdict on a new version of ``name``; its champion's version and CV AUC."""
    current = client.get_registered_model(name).aliases.get("champion")
    if current is None:
        verdict = decide(evidence, None, new_auc=new_auc, champion=None, gate=gate, margin=margin)
        return verdict, None, None
    champion_auc = float(client.get_model_version(name, current).tags.get("cv_auc_mean", "nan"))
    champion_evidence = version_evidence(client, name, current)
    verdict = decide(
        evidence,
        champion_evidence,
        new_auc=new_auc,
        champion=str(current),
        gate=gate,
        margin=margin,
    )
    return verdict, current, champion_auc


def gate_record(verdict: Verdict) -> dict:
    """The verdict for the register record: decision, reason, rule and the comparison."""
    c = verdict.comparison
    return {
        "decision": verdict.decision,
        "reason": verdict.reason,
        "rule": verdict.rule,
        "comparison": None if c is None else dataclasses.asdict(c),
    }
