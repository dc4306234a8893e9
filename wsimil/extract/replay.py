"""One slide file → its bag, the way the pipeline made the training bags.

A served model that accepts slide paths must select tiles and embed them exactly as the
feature caches it was trained on were made. Those caches record everything needed in their
:class:`wsimil.extract.cache.Provenance` attributes: the tile settings, the extractor and
the rule versions. :func:`recorded_extraction` reads them at registration (as the record's
attributes, which the served model carries as ``extraction.json``); :func:`slide_bag`
replays them with :func:`wsimil.extract.tiles.select_tiles` and
:func:`wsimil.extract.embed.embed_selection`, the same functions the ``tiles`` and
``features`` stages run, and refuses a record made under other rule versions than this code applies.
"""

from __future__ import annotations

from pathlib import Path

from wsimil.config import FeaturesConfig, TilesConfig
from wsimil.extract.cache import TORCHSCRIPT_SUFFIXES, Provenance, ProvenanceError, read_attrs
from wsimil.extract.instances import SlideBag


class ExtractionError(Exception):
    """Recorded extraction settings that are missing or inconsistent; names the files."""


def recorded_extraction(features_root: Path, scales: tuple[str, ...]) -> dict:
    """The tile and extractor settings every cache under ``features_root`` agrees on.

    Raises:
        ExtractionError: no cache file, a file without the attributes, or files made with
            different settings (a half-finished re-extraction).
    """
    files = sorted(f for s in scales for f in (Path(features_root) / s).glob("*.h5"))
    if not files:
        raise ExtractionError(
            f"{features_root}: no feature caches for scales {', '.join(scales)}; "
            "run `wsimil features` (or `dvc repro`)"
        )
    seen: dict[str, object] | None = None
    for path in files:
        values = _record(read_attrs(path) or {}, f"{path}: not a wsimil cache").to_attrs()
        if seen is None:
            seen, first = values, path
        elif values != seen:
            diff = sorted(k for k in seen.keys() | values.keys() if values.get(k) != seen.get(k))
            raise ExtractionError(
                f"{path} and {first} were made with different {', '.join(diff)}; "
                "run `wsimil features` so that every cache comes from one extractor"
            )
    return dict(seen)


def _record(extraction: dict, where: str) -> Provenance:
    """The tile and extractor parts of the provenance record in ``extraction``."""
    try:
        return Provenance.from_attrs(extraction, slide=False)
    except ProvenanceError as exc:
        raise ExtractionError(f"{where} ({exc})") from None


def check_rules(record: Provenance) -> None:
    """Refuse a record made under other tile or feature rules than this code applies.

    Raises:
        ExtractionError: a recorded rule version differs (records without one pass).
    """
    from wsimil.extract.embed import FEATURES_RULE
    from wsimil.extract.grid import TISSUE_RULE
    from wsimil.extract.tiles import TILES_RULE

    tile_rule = TILES_RULE if record.tiles.tissue is None else TISSUE_RULE
    for what, recorded, current in (
        ("tile", record.tiles.rule, tile_rule),
        ("feature", record.extractor.rule, FEATURES_RULE),
    ):
        if recorded is not None and recorded != current:
            raise ExtractionError(
                f"the feature caches were made under {what} rule {recorded} and this wsimil "
                f"applies {what} rule {current}, so slides would not be embedded the way the "
                "model was trained; serve it with the wsimil that made its caches, or "
                "re-extract and train again"
            )


def build_recorded_extractor(extraction: dict, weights_file: Path | None, device: str):
    """The recorded extractor, checked against the recorded weights hash.

    Args:
        extraction: from :func:`recorded_extraction`.
        weights_file: the weights (or TorchScript) file shipped with the model; None for
            ``weights: random`` (rebuilt from ``init_seed``).
        device: ``auto`` | ``cpu`` | ``cuda``.

    Raises:
        ExtractionError: the weights are needed but absent, or they hash differently.
    """
    from wsimil.extract.extractors import build_extractor

    record = _record(extraction, "recorded extraction")
    check_rules(record)
    ex = record.extractor
    name, weights = ex.extractor, ex.weights
    if ex.stain_norm:  # the reference tile does not travel with the model (yet)
        raise ExtractionError(
            f"extractor {name} ran with features.stain_norm {ex.stain_norm}, which slide-path "
            "input cannot replay; send precomputed features instead"
        )
    if weights != "random" and weights_file is None:
        raise ExtractionError(
            f"extractor {name} ({weights}) needs its weight file, which this model does not "
            "carry (registered with registry.include_extractor: false or without the file)"
        )
    if weights == "random":
        cfg = {"extractor": name, "weights": "random"}
    elif Path(name).suffix in TORCHSCRIPT_SUFFIXES:  # TorchScript carries its weights
        cfg = {"extractor": str(weights_file), "weights": "pretrained"}
    else:
        cfg = {"extractor": name, "weights": str(weights_file)}
    features = FeaturesConfig(
        **cfg, init_seed=ex.init_seed or 0, input_px=ex.input_px or None, device=device
    )
    extractor = build_extractor(features, record.tiles.cut_px)
    # A carried state dict was re-saved as safetensors: its own hash was recorded then.
    expected = str(extraction.get("weights_file_sha256") or ex.weights_sha256)
    if extractor.weights_sha256 != expected:
        raise ExtractionError(
            f"extractor {name}: weights hash {extractor.weights_sha256[:12]} differs from the "
            f"recorded {expected[:12]}; the model was trained on features of other weights"
        )
    if extractor.dim != ex.feature_dim:
        raise ExtractionError(
            f"extractor {name} gives {extractor.dim}-D features, the caches hold {ex.feature_dim}-D"
        )
    return extractor


def slide_bag(
    path: Path,
    slide_id: str,
    extraction: dict,
    extractor,
    scales: tuple[str, ...],
    *,
    batch_size: int,
) -> SlideBag:
    """Select a slide's tiles and embed them at ``scales`` with the recorded settings.

    ``slide_id`` seeds the draw of each 10x tile's 20x child, as the slide_id column of
    slides.csv did when the caches were made: the same id gives the same bag.

    Raises:
        wsimil.extract.slide.SlideError: the slide cannot be opened, has no magnification, or has
            no tissue.
    """
    from wsimil.extract.embed import embed_selection
    from wsimil.extract.slide import SlideRef, open_slide
    from wsimil.extract.tiles import select_tiles

    record = _record(extraction, "recorded extraction")
    with open_slide(SlideRef(slide_id, Path(path))) as slide:
        sel = select_tiles(slide, TilesConfig(**record.tiles.params()))
        embedded = embed_selection(
            slide,
            sel,
            extractor,
            scales,
            input_px=record.extractor.input_px or None,
            batch_size=batch_size,
            num_workers=0,
        )
    return SlideBag.from_arrays(
        slide_id,
        None,
        embedded.features,
        [sel.grid(s) for s in scales],
        [sel.coords(s) for s in scales],
        [scale.tile_size_level0 for scale in embedded.scales],
    )
