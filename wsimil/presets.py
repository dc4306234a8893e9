"""Presets: named params overlays in ``presets/`` that set a paper's protocol in one step.

A preset is a params file of a few keys (``presets/dtfd-mil.yaml``). ``wsimil <command>
--preset NAME`` merges it over params.yaml (:func:`wsimil.config.load_params` owns the
merge; ``-S`` overrides still win); for DVC, :func:`dvc_set_args` spells the same keys as
``dvc exp run -S`` arguments, so a tracked experiment records every value it changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsimil.config import ConfigError, read_mapping

PRESETS_DIR = "presets"  # under the project root (the folder holding params.yaml)


def names(root: Path) -> list[str]:
    """The presets of the project at ``root``, by name."""
    return sorted(p.stem for p in (Path(root) / PRESETS_DIR).glob("*.yaml"))


def preset_file(root: Path, name: str) -> Path:
    """``presets/<name>.yaml`` under ``root``, or ``name`` itself when it is a YAML file.

    Raises:
        ConfigError: no such preset; the message lists the ones there are.
    """
    as_file = Path(name)
    if as_file.suffix in (".yaml", ".yml") and as_file.is_file():
        return as_file
    path = Path(root) / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(names(root)) or "none"
        raise ConfigError(
            f"--preset {name}: no {PRESETS_DIR}/{name}.yaml under {root} (presets: {known}); "
            "give a preset name or a params overlay file"
        )
    return path


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: one dotted key per leaf value."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def dvc_set_args(path: Path) -> list[str]:
    """``dvc exp run`` arguments that set every key of the overlay at ``path``.

    ``++key=value`` is Hydra's override-or-add (DVC parses ``-S`` with Hydra's grammar), so
    keys params.yaml does not spell out yet are added too; values are compact JSON, which
    the grammar reads back as the same number, string, bool, null or list.
    """
    args = []
    for key, value in flatten(read_mapping(Path(path), allow_empty=False)).items():
        args += ["-S", f"++{key}={json.dumps(value, separators=(',', ':'))}"]
    return args
