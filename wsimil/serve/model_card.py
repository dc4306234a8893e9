"""The model card: a registered version's description (data, metrics, intended use, limits)."""

from __future__ import annotations

from wsimil.models import MODELS
from wsimil.train.manifest import Manifest


def recipe_note(extractor: str) -> str:
    """`` (recipe: <paper>, <HF repo>, <licence>)`` for a foundation-model recipe, else ``""``."""
    from wsimil.extract.recipes import RECIPES

    recipe = RECIPES.get(extractor)
    if recipe is None:
        return ""
    return f" (recipe: {recipe.paper}; `{recipe.hf_repo}`; {recipe.licence})"


def model_card(name: str, doc: Manifest, tags: dict[str, str]) -> str:
    """Markdown for one version of ``name``.

    Args:
        doc: the ensemble manifest (``ensemble.json``).
        tags: the version's tags (:func:`wsimil.serve.registry.version_tags`).
    """
    family, classes = doc.family, doc.classes
    thresholds = [t for t in doc.thresholds if t is not None]
    if len(classes) == 2 and thresholds:
        mean_t = sum(thresholds) / len(thresholds)
        rule = (
            f"`{classes[1]}` when p({classes[1]}) ≥ {mean_t:.4f}, the mean of the fold "
            f"thresholds ({', '.join(f'{t:.3f}' for t in thresholds)}), each chosen by "
            "Youden's J on its fold's validation patients, never on test data"
        )
    else:
        rule = "the class of highest mean probability"
    cv = doc.cv
    nan = float("nan")
    rows = "\n".join(
        f"| {m.upper()} | {cv.get(f'{m}_mean', nan):.3f} | {cv.get(f'{m}_std', nan):.3f} |"
        for m in ("acc", "f1", "auc")
    )
    weights = tags.get("extractor_weights", "?")
    warning = (
        "\n- **The extractor has random weights** (a demo setting): the features, and hence "
        "this model, mean nothing outside the synthetic demo."
        if weights == "random"
        else ""
    )
    get = lambda k: tags.get(k, "unknown")  # noqa: E731
    return f"""# {name} — {MODELS[family].paper if family in MODELS else family}, fold ensemble

**Task.** Slide-level classification into {", ".join(f"`{c}`" for c in classes)} from
tile features ({", ".join(doc.scales)}; {"+".join(str(d) for d in doc.in_dims)}-D).

**Model.** The {len(doc.folds)} fold models of one cross-validation (the best tuning
trial). Answer: the mean of the fold models' class probabilities; label: {rule}.
Per instance: the fold-mean score, top instances returned with their coordinates.

## Data
- cohort: {get("cohort")}; {get("n_slides")} slides; data version (DVC md5 of the
  feature cache): `{get("data_version")}`
- features: extractor `{get("extractor")}`{recipe_note(get("extractor"))},
  {get("extractor_dim")}-D, weights `{weights}` (SHA-256
  `{get("extractor_weights_sha256")[:16]}`), stain normalisation {get("stain_norm")}
- code: git `{get("git_commit")}` (uncommitted changes: {get("git_dirty")}); source
  cross-validation run `{get("source_run_id")}`

## Metrics
{len(doc.folds)}-fold cross-validation, patients grouped, test folds held out
(mean ± std over folds):

| metric | mean | std |
|---|---|---|
{rows}

## Champion gate
{get("champion_gate_reason")}.

Rule: {get("champion_gate_rule")}. Evidence: the pooled test predictions of the source
cross-validation (test folds `{get("test_folds_sha256")}`).

## Intended use
Research on whole-slide-image MIL and a worked example of the wsimil MLOps loop
(features → tuned fold ensemble → registry → serving). Not a medical device; not for
diagnosis or any decision about a patient.

## Limits
- Input must be features of the same extractor and tile settings; the server checks the
  feature width, not their provenance. Slide-path input replays the recorded tile rule and
  extractor.
- The CV estimate is optimistic: tuning chose this trial on the same folds.
- Instance scores rank tiles within a slide (heatmap material); they are not calibrated
  tumour probabilities.{warning}

## Serving
`mlflow models serve -m models:/{name}@champion --env-manager local -p 5001`
(request and answer formats: `wsimil/serve/pyfunc.py`, README "Registry and serving").
"""
