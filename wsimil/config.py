"""Typed configuration: one pydantic model per ``params.yaml`` section.

Every section forbids unknown keys, so a typo such as ``lamda: 1`` fails loudly with the
file and the key named. Only ``wsimil.cli`` calls :func:`load_params`; everything below it
receives these objects, never the YAML.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """A params file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data ---------------------------------------------------------------------------------


class SynthConfig(Section):
    """The synthetic demo cohort (`wsimil synth`): real pyramidal TIFF slides."""

    out_dir: Path = Path("data/demo")
    n_slides: int = Field(32, ge=2)
    n_patients: int = Field(24, ge=2)
    positive_fraction: float = Field(0.5, gt=0, lt=1)
    mode: Literal["binary", "subtypes"] = "binary"
    tumour_share: float = Field(0.05, gt=0, lt=1, description="share of tissue area")
    width_px: int = Field(3072, ge=512, description="level-0 (20x) width")
    height_px: int = Field(2048, ge=512, description="level-0 (20x) height")
    mpp: float = Field(0.5, gt=0, description="level-0 microns per pixel")
    tiff_tile_px: int = Field(256, ge=16)
    n_levels: int = Field(4, ge=1, le=8)
    jpeg_quality: int = Field(90, ge=10, le=100)
    mask_downsample: int = Field(16, ge=1, description="mask pixel = this many level-0 px")
    seed: int = 0

    @model_validator(mode="after")
    def _patients_fit(self) -> SynthConfig:
        if self.n_patients > self.n_slides:
            raise ValueError(
                f"n_patients ({self.n_patients}) must not exceed n_slides ({self.n_slides})"
            )
        if self.tiff_tile_px % 16:
            raise ValueError("tiff_tile_px must be a multiple of 16 (TIFF tiles)")
        return self


# --- evaluation -----------------------------------------------------------------------------


class CrossvalConfig(Section):
    """The cross-validation protocol (SPEC §6), shared by every model family."""

    cohort_csv: Path = Path("data/demo/slides.csv")
    splits_path: Path = Path("data/splits.json")
    n_folds: int = Field(5, ge=2)
    val_folds: int = Field(4, ge=2, description="validation = 1/val_folds of the rest")
    seed: int = 0
    experiment: str = Field("wsimil-demo", min_length=1, description="MLflow experiment")


class Params(Section):
    """The whole params.yaml. Sections absent from the file take their defaults."""

    synth: SynthConfig = SynthConfig()
    crossval: CrossvalConfig = CrossvalConfig()


# --- loading --------------------------------------------------------------------------------


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc``'s parent, to suggest a fix for an unknown key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe_validation_error(err: ValidationError, path: Path) -> str:
    """One line per problem, each naming the file and the dotted key."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _fmt_loc(loc)
        if e["type"] == "extra_forbidden":
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(Params, loc), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            lines.append(f"{path}: unknown key '{key}'{hint}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: bad value for '{key}': {e['msg']}{shown}")
    return "\n".join(lines)


def load_params(path: Path) -> Params:
    """Read and validate a params file; raise :class:`ConfigError` with an actionable message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such params file; run from the repository root or pass --params"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, path)) from None
