"""What every command shares: the ``--params``/``--set``/``--preset`` options, the one
loader of ``params.yaml`` (:func:`project`) and the one way to fail (one ``error:`` line)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from wsimil import progress
from wsimil.config import ConfigError, Params, load_params

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="the params file; its folder is the project root")
]

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        help="override a params.yaml key for this run only: KEY=VALUE, e.g. "
        "-S model.dtfd.n_pseudo_bags=8 (DVC users: `dvc exp run -S` instead)",
    ),
]

PresetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--preset",
        help="merge a params overlay over params.yaml: a name in presets/ (dtfd-mil, "
        "dmsmil-paper; see `wsimil presets`) or a YAML file; --set still wins",
    ),
]

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="a model family (default model.name); see `wsimil models`"),
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@contextlib.contextmanager
def failing(*errors: type[Exception]):
    """A stage's expected errors (each names what to fix) as one ``error:`` line, exit 2."""
    try:
        yield
    except errors as exc:
        fail(str(exc))


def parse_sets(sets: list[str] | None) -> dict[str, object]:
    """``["a.b=1", "c=[1, 2]"]`` → ``{"a.b": 1, "c": [1, 2]}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. model.dmsmil.lam=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            fail(
                f"--set {item!r}: {value!r} is not valid YAML ({problem}); give a YAML value, "
                "e.g. KEY=0.5, KEY=[1, 2] or KEY='some text'"
            )
    return out


def project(
    params_path: Path, sets: list[str] | None = None, presets: list[str] | None = None
) -> tuple[Params, Path]:
    """Validate params.yaml (plus ``--preset`` overlays, then ``--set``); runtime defaults.

    Returns:
        The params with every path absolute under the project root, and the root.

    Exits with one clear line when the file, a key or a value is bad.
    """
    from wsimil.config import with_overrides
    from wsimil.presets import preset_file
    from wsimil.runtime import apply_runtime_defaults

    root = params_path.resolve().parent
    try:
        overlays = [preset_file(root, name) for name in presets or []]
        params = load_params(params_path, allow_empty=False, overlays=overlays)
        if sets:
            params = with_overrides(params, parse_sets(sets))
    except ConfigError as exc:
        fail(str(exc))
    apply_runtime_defaults(root)
    check_progress_setting()
    return params.under(root), root


def check_progress_setting() -> None:
    """A bad ``WSIMIL_PROGRESS`` is one line here, not a traceback inside a flow."""
    try:
        progress.enabled()
    except ValueError as exc:
        fail(str(exc))


def family(params: Params, model: str | None) -> str:
    """``--model``, or model.name; exits naming the choices when it is not in MODELS."""
    from wsimil.models import MODELS

    name = model or params.model.name
    if name not in MODELS:
        fail(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return name
