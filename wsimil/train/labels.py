"""The classes of a cohort: declared, or checked for typos.

A label typo (``tumor`` next to ``tumour``) silently adds a class and changes the task.
With the classes declared (``crossval.classes``, or the labels ``wsimil synth`` writes for
its cohort) an unknown label is an error listing the count of every label. Without a
declaration, a class with very few slides, or one whose name is close to another's, is
warned about.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pandas as pd

MIN_SLIDES = 3  # fewer slides than this (or than n_folds) in a class: probably a mistake


class LabelError(ValueError):
    """A label outside the declared classes; the message lists the counts per label."""


def check_labels(
    table: pd.DataFrame,
    csv: Path,
    declared: list[str] | None,
    *,
    source: str,
    n_folds: int,
) -> list[str]:
    """Check the ``label`` column of a cohort table.

    Args:
        table: the cohort, as :func:`wsimil.train.bags.read_cohort` returns it.
        csv: its file, for the messages.
        declared: the declared classes, or None.
        source: where the declaration comes from (``params.yaml → crossval.classes``).
        n_folds: the number of folds (a class needs at least that many slides).

    Returns:
        Warnings, one line each.

    Raises:
        LabelError: a label is not one of ``declared``.
    """
    counts = table["label"].value_counts(sort=False).sort_index()
    shown = ", ".join(f"{label} {n}" for label, n in counts.items())
    if declared is not None:
        unknown = [label for label in counts.index if label not in declared]
        if unknown:
            label = unknown[0]
            lines = table.attrs.get("lines") or [i + 2 for i in range(len(table))]
            at = [lines[i] for i in (table["label"] == label).to_numpy().nonzero()[0][:5]]
            close = difflib.get_close_matches(label, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LabelError(
                f"{csv}: label {label!r} on line(s) {at} is not one of the classes "
                f"{list(declared)} ({source}){hint}; slides per label: {shown}; fix the label "
                f"column or declare the class in {source}"
            )
        absent = [c for c in declared if c not in counts.index]
        return [f"{csv}: declared class {c!r} ({source}) has no slide" for c in absent]
    warnings = []
    few = max(MIN_SLIDES, n_folds)
    for label, n in counts.items():
        if n < few:
            warnings.append(
                f"{csv}: label {label!r} has only {n} slide(s) (slides per label: {shown}); "
                "if it is a typo fix it, else declare the classes in params.yaml → "
                "crossval.classes"
            )
    labels = [str(c) for c in counts.index]
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() >= 0.8:
                warnings.append(
                    f"{csv}: labels {a!r} ({counts[a]} slides) and {b!r} ({counts[b]} slides) "
                    "look alike; if one is a typo fix it, else declare the classes in "
                    "params.yaml → crossval.classes"
                )
    return warnings


def declared_classes(crossval, synth, root: Path) -> tuple[list[str] | None, str]:
    """The declared classes and where they are declared (None, "" when they are not).

    ``crossval.classes`` wins; otherwise the cohort that ``wsimil synth`` writes
    (``<synth.out_dir>/slides.csv``) has the two labels of ``synth.mode``.
    """
    if crossval.classes is not None:
        return list(crossval.classes), "params.yaml → crossval.classes"
    from wsimil.synth import LABELS

    synth_csv = (Path(root) / synth.out_dir / "slides.csv").resolve()
    if (Path(root) / crossval.cohort_csv).resolve() == synth_csv:
        return list(LABELS[synth.mode]), f"the synthetic cohort (synth.mode: {synth.mode})"
    return None, ""
