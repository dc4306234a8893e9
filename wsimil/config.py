"""Typed configuration: one pydantic model per ``params.yaml`` section.

Every section forbids unknown keys, so a typo such as ``lamda: 1`` fails loudly with the
file and the key named. Only ``wsimil.cli`` calls :func:`load_params`; everything below it
receives these objects, never the YAML.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

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
    # Tissue-segmentation cohorts (wsimil/synth_tissue.py); off: the demo cohort as before.
    tissue_masks: bool = Field(False, description="write masks/<id>.tissue.png (ground truth)")
    pen_marks: int = Field(0, ge=0, description="ink strokes per slide (masks/<id>.pen.png)")
    tiled_render: bool = Field(False, description="render tile by tile: 40,000 x 30,000 px")
    # Two-scale evidence (wsimil/synth_twoscale.py): positives carry a lesion seen at 20x
    # only (fine texture) or at 10x only (architecture); off: the demo cohort as before.
    twoscale: bool = Field(False, description="a 20x-only or a 10x-only lesion per positive")
    twoscale_cell_px: int = Field(128, ge=2, description="architecture squares: tiles.tile_px")
    twoscale_texture_amp: int = Field(24, ge=1, le=127, description="fine texture: ± grey levels")

    @model_validator(mode="after")
    def _twoscale_fits(self) -> SynthConfig:
        if self.twoscale and (self.mode != "binary" or self.tiled_render):
            raise ValueError("synth.twoscale needs mode: binary and tiled_render: false")
        if self.twoscale_cell_px % 2:
            raise ValueError("synth.twoscale_cell_px must be even (whole 10x pixels)")
        return self

    @model_validator(mode="after")
    def _patients_fit(self) -> SynthConfig:
        if self.n_patients > self.n_slides:
            raise ValueError(
                f"n_patients ({self.n_patients}) must not exceed n_slides ({self.n_slides})"
            )
        if self.tiff_tile_px % 16:
            raise ValueError("tiff_tile_px must be a multiple of 16 (TIFF tiles)")
        return self


class TissueConfig(Section):
    """The tissue rule (`tiles.rule: tissue`, SPEC §1b): a tissue mask and every tile on it."""

    mpp: float = Field(0.5, gt=0, description="grid µm/px (0.5 = 20x); parents at twice this")
    tile_px: int = Field(256, ge=16, description="tile side at mpp (DTFD-MIL: 256)")
    overlap_px: int = Field(0, ge=0, description="pixels shared by neighbouring tiles")
    min_tissue: float = Field(0.5, gt=0, le=1, description="keep tiles with this tissue share")
    mask_mpp: float = Field(16.0, gt=0, description="µm/px of the low-resolution mask (~8-32)")
    threshold: Literal["otsu", "fixed"] = Field("otsu", description="saturation threshold rule")
    saturation_threshold: int = Field(20, ge=0, le=255, description="used when threshold: fixed")
    median_px: int = Field(7, ge=1, description="median blur side at mask_mpp (odd)")
    close_px: int = Field(4, ge=0, description="morphological closing side at mask_mpp")
    min_tissue_um2: float = Field(20000.0, ge=0, description="smaller tissue regions dropped")
    min_hole_um2: float = Field(20000.0, ge=0, description="smaller holes are filled")
    remove_pen: bool = Field(False, description="drop blue, green and black ink from the mask")

    @model_validator(mode="after")
    def _fits(self) -> TissueConfig:
        if self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be below tile_px")
        if self.median_px % 2 == 0:
            raise ValueError(f"median_px ({self.median_px}) must be odd")
        return self


class TilesConfig(Section):
    """Which tiles a slide keeps (`wsimil tiles`): the DMSMIL rule (SPEC §1) or all tissue (§1b)."""

    rule: Literal["density_top_k", "tissue"] = Field(
        "density_top_k", description="density_top_k: DMSMIL's top-K; tissue: every tissue tile"
    )
    tissue: TissueConfig = TissueConfig()

    @property
    def cut_px(self) -> int:
        """The side of the tiles the active rule cuts (what the extractor sees)."""
        return self.tissue.tile_px if self.rule == "tissue" else self.tile_px

    slides_csv: Path = Path("data/demo/slides.csv")
    out_dir: Path = Path("data/tiles")
    report: Path = Path("reports/tiles.csv")
    tile_px: int = Field(512, ge=16, description="tile side at 10x and at 20x (paper: 512)")
    top_k: int = Field(200, ge=1, description="densest 10x tiles kept (paper: 200)")
    density_threshold: int = Field(200, ge=1, le=255, description="tissue: a channel below")
    min_density: float = Field(0.0, ge=0, lt=1, description="tiles at or below: background")
    seed: int = Field(0, description="draws each tile's 20x child (with the slide_id)")
    mpp_override: float | None = Field(None, gt=0, description="µm/px if a slide has none")
    concurrent_slides: int = Field(2, ge=1, description="slides processed at once")


class FeaturesConfig(Section):
    """Tile embeddings → per-slide HDF5 caches (`wsimil features`, SPEC §2)."""

    out_dir: Path = Path("data/features")
    report: Path = Path("reports/features.csv")
    extractor: str = Field(
        "resnet101", description="recipe (`wsimil extractors`), table name, timm name, file"
    )
    weights: str = Field(
        "pretrained", description="pretrained | random | weights file | HF snapshot folder"
    )
    allow_network: bool = Field(False, description="may download weights / hub models")
    init_seed: int = Field(0, description="seed of `weights: random`")
    input_px: int | None = Field(None, ge=16, description="resize tiles for the network")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader processes reading tiles")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    concurrent_slides: int = Field(2, ge=1, description="slides in flight (one shared model)")
    deterministic: bool = Field(
        False, description="deterministic torch kernels (GPU: slower; CPU is bit-exact anyway)"
    )
    stain_norm: Literal["macenko", "reinhard"] | None = Field(
        None, description="stain normalisation before the network (null: none)"
    )
    stain_reference: Path | None = Field(None, description="reference tile for stain_norm")

    @model_validator(mode="after")
    def _stain_reference_given(self):
        if self.stain_norm and self.stain_reference is None:
            raise ValueError(
                f"features.stain_norm is {self.stain_norm} but features.stain_reference is "
                "not set: point it at a reference tile image"
            )
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
    out_dir: Path = Path("results/crossval")
    n_heatmaps: int = Field(3, ge=0, description="heatmaps drawn per run (tumour slides)")
    parallel_folds: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="folds fitted at once, a process each; auto: the fewest that finish soonest"
    )
    classes: list[str] | None = Field(
        None, min_length=2, description="the labels slides.csv may use; others are an error"
    )


# --- models ---------------------------------------------------------------------------------


class ABMILConfig(Section):
    """ABMIL (Ilse et al. 2018): instance MLP, gated attention pooling, linear classifier."""

    hidden_dims: tuple[int, ...] = Field((512,), description="Linear+ReLU+Dropout widths")
    attention_dim: int = Field(128, ge=1, description="D of the gated attention")
    gated: bool = True
    dropout: float = Field(0.25, ge=0, lt=1)


class DTFDConfig(Section):
    """DTFD-MIL (Zhang et al. 2022), SPEC §3."""

    hidden_dims: tuple[int, ...] = Field((512,), description="dimension reduction widths")
    attention_dim: int = Field(128, ge=1, description="D of both tiers' gated attention")
    dropout: float = Field(0.0, ge=0, lt=1)
    n_pseudo_bags: int = Field(4, ge=1, description="M pseudo-bags per slide")
    distill: Literal["maxs", "maxmins", "mas", "afs"] = "afs"
    n_eval_repeats: int = Field(4, ge=1, description="seeded partitions averaged at eval")
    partition_seed: int = 0


class DMSMILConfig(Section):
    """DMSMIL (SPEC §4); DAMIL is the same model on one scale and ignores ``ot``/``fusion``."""

    dim: int = Field(512, ge=1, description="d of the per-scale projection")
    deformable: bool = Field(True, description="off = plain projection (Tables 4-5)")
    heads: int = Field(8, ge=1, description="M attention heads")
    points: int = Field(4, ge=1, description="U sampling points per head")
    offset_scale: float = Field(3.0, gt=0, description="c: |offset| <= c grid cells")
    ot: Literal["exact", "sinkhorn", "off"] = "exact"
    ot_features: Literal["attended", "projected"] = "attended"
    sinkhorn_reg: float = Field(0.1, gt=0)
    fusion: Literal["attention", "mean"] = "attention"
    fusion_dim: int = Field(128, ge=1, description="V of the scale attention (Eq. 11)")
    lam: float = Field(1.0, ge=0, description="λ in L = L_ot + λ·L_ce (Eq. 14)")
    dropout: float = Field(0.0, ge=0, lt=1)
    attribution_steps: int = Field(
        8, ge=1, le=256, description="m of the integrated-gradients instance score"
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> DMSMILConfig:
        if self.deformable and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class ModelConfig(Section):
    """Which MIL model to fit, plus one sub-section per model family."""

    name: Literal["abmil", "dtfd", "damil", "dmsmil"] = "dmsmil"
    scale: Literal["10x", "20x"] = Field("20x", description="the scale single-scale models read")
    abmil: ABMILConfig = ABMILConfig()
    dtfd: DTFDConfig = DTFDConfig()
    dmsmil: DMSMILConfig = DMSMILConfig()


# --- training -------------------------------------------------------------------------------


class TrainConfig(Section):
    """How one model family is fitted on one split (SPEC §3-4 optimisation settings)."""

    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["constant", "step"] = "constant"
    step_at: float = Field(0.5, gt=0, lt=1, description="step schedule: share of epochs")
    step_factor: float = Field(0.2, gt=0, le=1, description="step schedule: lr multiplier")
    grad_clip: float | None = Field(None, gt=0, description="max grad norm per clip group")
    batch_size: int = Field(1, ge=1, description="slides per step (1 in both papers)")
    early_stopping_patience: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    standardize: bool = Field(
        True, description="z-score instance features with the training bags' statistics"
    )
    cpu_threads: int | None = Field(
        1, ge=1, description="torch threads on CPU (MIL steps are small: 1 is fastest)"
    )
    seed: int = Field(0, description="with the fold and trial, seeds initial weights and order")
    deterministic: bool = Field(
        False, description="deterministic torch kernels (GPU: slower; CPU is bit-exact anyway)"
    )
    max_grid_cells: int = Field(
        1_000_000, ge=1, description="grid models: a bag's tile-grid extent (cols x rows)"
    )


class TrainSection(Section):
    """One train config per model family, defaulting to each paper's reference setting."""

    abmil: TrainConfig = TrainConfig(epochs=100, lr=1e-4, weight_decay=1e-4)
    dtfd: TrainConfig = TrainConfig(
        epochs=200, lr=1e-4, weight_decay=1e-4, schedule="step", grad_clip=5.0
    )
    dmsmil: TrainConfig = TrainConfig(epochs=120, lr=1e-4, weight_decay=1e-4)
    damil: TrainConfig = TrainConfig(epochs=120, lr=1e-4, weight_decay=1e-4)


# --- tuning ---------------------------------------------------------------------------------


class SearchParam(Section):
    """One dimension of a search space: a float or int range, or a list of choices."""

    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str | int | float | bool] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> SearchParam:
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.kind} parameter needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(
                f"empty or inverted range: low={self.low} is not below high={self.high}"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int range needs whole-number 'low' and 'high'")
        return self


class AblateCell(Section):
    """One cell of an ablation grid: a model family and the params keys it changes."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.=+-]+$", description="folder name")
    family: Literal["abmil", "dtfd", "damil", "dmsmil"] | None = None  # None: the grid's model
    set: dict[str, Any] = Field(default_factory=dict, description="dotted params keys")
    x: float | None = Field(None, description="the swept value, for the plot's x axis")
    series: str | None = Field(None, description="the plot's line this cell belongs to")


class AblateGrid(Section):
    """An ablation grid (`wsimil ablate`): cells cross-validated on the shared folds."""

    reference: str = Field(description="the cell every other one is compared with, paired")
    cells: list[AblateCell] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> AblateGrid:
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise ValueError(
                f"cell names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}"
            )
        if self.reference not in names:
            raise ValueError(f"reference '{self.reference}' is not a cell; name one of {names}")
        return self


class AblateConfig(Section):
    """Ablation grids (`wsimil ablate`): where they go and how differences are bounded."""

    out_dir: Path = Path("results/ablate")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided CI of Δ vs reference")
    grids: dict[str, AblateGrid] = Field(default_factory=dict, description="custom grids")


class TuneConfig(Section):
    """Optuna over cross-validation (`wsimil tune --model <family>`).

    ``space`` maps a family to its search space: dotted params.yaml keys (``model.dmsmil.lam``,
    ``train.dtfd.lr``) to ranges. Keys are checked against the params before any trial runs.
    """

    n_trials: int = Field(20, ge=1, description="the study's total budget over all workers")
    timeout_s: float | None = Field(None, gt=0, description="per worker")
    pruner: Literal["wilcoxon", "median", "none"] = "wilcoxon"
    pruner_startup_trials: int = Field(2, ge=0, description="trials never pruned (median)")
    storage: str | None = Field(None, description="None: journal file in out_dir; or an RDB URL")
    study_name: str | None = Field(None, description="None: <experiment>-<family>")
    sampler_seed: int = 0
    out_dir: Path = Path("results/tune")
    space: dict[str, dict[str, SearchParam]] = {}


# --- registry and serving -------------------------------------------------------------------


class ChampionGateConfig(Section):
    """How sure an AUC gain must be before ``champion`` moves (:mod:`wsimil.serve.champion_gate`).

    Challenger and champion are compared paired, on the test folds both were scored on.
    """

    test: Literal["bootstrap", "folds"] = Field(
        "bootstrap",
        description="bootstrap: resample the pooled test slides; folds: per-fold AUC, "
        "Nadeau-Bengio corrected paired t",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="one-sided: the gain's lower bound at this level"
    )
    resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples")


class RegistryConfig(Section):
    """Publish a tuned fold ensemble to the MLflow registry (`wsimil register --model <family>`).

    The source is ``<source_dir>/<family>/best/models`` (written by ``wsimil tune``); the
    registered model is ``<name_prefix><family>``. Every new version gets the alias
    ``challenger``; ``champion`` moves to it only when, on the same test folds, the lower
    confidence bound of its AUC gain over the champion exceeds ``champion_margin``.
    """

    source_dir: Path = Path("results/tune")
    name_prefix: str = Field("wsimil-", min_length=1)
    champion_margin: float = Field(
        0.0, ge=0, description="minimum AUC gain over the champion (its lower bound must exceed)"
    )
    champion_gate: ChampionGateConfig = ChampionGateConfig()
    out_dir: Path = Path("results/register")
    include_extractor: bool = Field(True, description="carry extractor weights: slide input")


class ServeConfig(Section):
    """What the served model accepts; baked into each version at registration (model_config)."""

    max_instances: int = Field(20000, ge=1, description="per bag and scale; more is a 400")
    max_bags: int = Field(64, ge=1, description="bags per request")
    top_instances: int = Field(10, ge=0, description="top instance scores returned per scale")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_grid_cells: int = Field(1_000_000, ge=1, description="tile-grid extent of one bag")
    slide_batch_size: int = Field(32, ge=1, description="tiles per batch for slide-path input")
    max_request_mb: float = Field(
        64, gt=0, description="request body size; more is a 413 (a 20000 x 512 .npy bag is 55 MB)"
    )


class Params(Section):
    """The whole params.yaml. Sections absent from the file take their defaults."""

    synth: SynthConfig = SynthConfig()
    tiles: TilesConfig = TilesConfig()
    features: FeaturesConfig = FeaturesConfig()
    crossval: CrossvalConfig = CrossvalConfig()
    model: ModelConfig = ModelConfig()
    train: TrainSection = TrainSection()
    tune: TuneConfig = TuneConfig()
    ablate: AblateConfig = AblateConfig()
    registry: RegistryConfig = RegistryConfig()  # `register` would shadow ABC.register
    serve: ServeConfig = ServeConfig()

    def under(self, root: Path) -> Params:
        """These params with every path made absolute under the project root ``root``.

        Every ``Path`` field of a section is project-relative; so are ``features.extractor``
        and ``features.weights`` when they name a file or folder under ``root`` (a
        TorchScript extractor, a state-dict file, a Hugging Face snapshot folder).
        Absolute paths and names stay as they are.
        """
        root = Path(root)
        update = {}
        for name in type(self).model_fields:
            section = getattr(self, name)
            paths = {k: root / v for k, v in section if isinstance(v, Path)}
            if name == "features":
                files = {k: root / getattr(section, k) for k in ("extractor", "weights")}
                paths.update({k: str(f) for k, f in files.items() if f.exists()})
            update[name] = section.model_copy(update=paths)
        return self.model_copy(update=update)

    def relative_to(self, root: Path) -> Params:
        """The inverse of :meth:`under`: paths under ``root`` relative again, as written."""
        update = {}
        for name in type(self).model_fields:
            section = getattr(self, name)
            paths = {k: Path(as_written(v, root)) for k, v in section if isinstance(v, Path)}
            if name == "features":
                paths.update(
                    {k: as_written(getattr(section, k), root) for k in ("extractor", "weights")}
                )
            update[name] = section.model_copy(update=paths)
        return self.model_copy(update=update)


def as_written(value: str | Path, root: Path) -> str:
    """One value of :meth:`Params.under` as params.yaml gives it: relative to ``root`` again."""
    path = Path(value)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(value)


def with_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """A copy of ``params`` with dotted keys replaced (``{"model.dmsmil.lam": 0.5}``).

    The result is validated like params.yaml itself, so an unknown key or a bad value
    raises :class:`ConfigError` naming it.
    """
    tree = params.model_dump(mode="json")
    for key, value in overrides.items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown parameter '{key}' (no section '{part}')")
            node = node[part]
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown parameter '{key}'{hint}")
        node[parts[-1]] = value
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, Path("overrides"))) from None


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


def load_params(path: Path, *, allow_empty: bool = True, overlays: Sequence[Path] = ()) -> Params:
    """Read and validate a params file; raise :class:`ConfigError` with an actionable message.

    An empty file (or one of comments only) takes every default, unless ``allow_empty`` is
    False (the CLI): there it is more often a truncated file than a choice.

    ``overlays`` are params files of a few keys each (the presets in ``presets/``), merged
    over the file in order by :func:`merge_overlay`: a key an overlay names replaces the
    file's, every other key stays. Each overlay is checked on its own first, so an unknown
    key is reported against the overlay that has it.
    """
    path = Path(path)
    raw = read_mapping(path, allow_empty=allow_empty)
    for overlay in overlays:
        layer = read_mapping(Path(overlay), allow_empty=False)
        _validate(layer, Path(overlay))
        raw = merge_overlay(raw, layer)
    where = " + ".join(str(p) for p in (path, *overlays))
    return _validate(raw, Path(where))


def merge_overlay(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged in: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overlay(out[key], value)
        else:
            out[key] = value
    return out


def _validate(raw: dict, path: Path) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, path)) from None


def read_mapping(path: Path, *, allow_empty: bool) -> dict:
    """The YAML mapping in ``path``; :class:`ConfigError` naming the file when it is not one."""
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
    if raw is None and not allow_empty:
        raise ConfigError(
            f"{path}: empty (no sections); restore it, or write `{{}}` in it to take every default"
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw
