"""The synthetic cohort is made of real slides: OpenSlide opens them and the masks are true."""

from __future__ import annotations

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from wsimil.synth import write_cohort


def nuclear_fraction(rgb: np.ndarray) -> float:
    """Share of haematoxylin-dark pixels (eosin-only and white pixels have R > 200)."""
    return float((rgb[..., 0] < 150).mean())


def test_table_columns_and_patients(tiny_cohort, tiny_synth_config):
    out, table = tiny_cohort
    on_disk = pd.read_csv(out / "slides.csv")
    assert list(on_disk.columns[:4]) == ["slide_id", "patient_id", "label", "path"]
    assert len(on_disk) == tiny_synth_config.n_slides
    assert on_disk["patient_id"].nunique() == tiny_synth_config.n_patients
    assert set(on_disk["label"]) == {"normal", "tumour"}
    # Slides of one patient share the label (folds group by patient).
    assert (on_disk.groupby("patient_id")["label"].nunique() == 1).all()


def test_slides_open_with_openslide_and_report_mpp_and_levels(tiny_cohort, tiny_synth_config):
    out, table = tiny_cohort
    cfg = tiny_synth_config
    for row in table.itertuples():
        slide = openslide.OpenSlide(out / row.path)
        assert openslide.OpenSlide.detect_format(out / row.path) == "generic-tiff"
        assert slide.dimensions == (cfg.width_px, cfg.height_px)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(cfg.mpp)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(cfg.mpp)
        assert slide.level_downsamples == pytest.approx([1.0, 2.0, 4.0, 8.0])
        slide.close()


def test_read_region_at_10x_shows_tumour_where_the_mask_says(tiny_cohort, tiny_synth_config):
    out, table = tiny_cohort
    d = tiny_synth_config.mask_downsample
    checked = 0
    for row in table.itertuples():
        mask = np.asarray(Image.open(out / row.mask_path)) > 0
        slide = openslide.OpenSlide(out / row.path)
        level = slide.get_best_level_for_downsample(2.0)
        assert slide.level_downsamples[level] == 2.0  # the 10x level
        w, h = slide.level_dimensions[level]
        rgb = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
        slide.close()
        if row.label == "normal":
            assert not mask.any()
            continue
        # One mask pixel covers d/2 x d/2 pixels at 10x.
        cell = d // 2
        hc, wc = mask.shape
        cells = rgb[: hc * cell, : wc * cell].reshape(hc, cell, wc, cell, 3)
        nuclear = (cells[..., 0] < 150).mean(axis=(1, 3))  # (hc, wc)
        tissue = (cells.min(axis=-1) < 200).mean(axis=(1, 3)) > 0.5
        tumour_score = nuclear[mask].mean()
        stroma_score = nuclear[tissue & ~mask].mean()
        assert tumour_score > 3 * stroma_score, (row.slide_id, tumour_score, stroma_score)
        assert mask.mean() > 0
        checked += 1
    assert checked > 0


def test_realised_tumour_share_matches_config(tiny_cohort, tiny_synth_config):
    _, table = tiny_cohort
    shares = table.loc[table["label"] == "tumour", "tumour_share"]
    assert np.allclose(shares, tiny_synth_config.tumour_share, atol=0.01)


def test_same_seed_is_byte_identical(tmp_path, tiny_synth_config):
    cfg = tiny_synth_config.model_copy(update={"n_slides": 2, "n_patients": 2})
    a, b = tmp_path / "a", tmp_path / "b"
    write_cohort(cfg, a)
    write_cohort(cfg, b, n_jobs=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".tiff" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = tmp_path / "c"
    write_cohort(cfg.model_copy(update={"seed": cfg.seed + 1}), c)
    assert (a / "slides" / "synth-000.tiff").read_bytes() != (
        c / "slides" / "synth-000.tiff"
    ).read_bytes()


def test_subtypes_mode_gives_two_tumour_morphologies(tmp_path, tiny_synth_config):
    cfg = tiny_synth_config.model_copy(update={"mode": "subtypes", "seed": 3})
    table = write_cohort(cfg, tmp_path)
    assert set(table["label"]) == {"subtype_a", "subtype_b"}
    assert (table["tumour_share"] > 0).all()
    # Subtype a is crowded with nuclei; subtype b is eosinophilic with fewer nuclei.
    frac = {}
    for row in table.itertuples():
        mask = np.asarray(Image.open(tmp_path / row.mask_path)) > 0
        slide = openslide.OpenSlide(tmp_path / row.path)
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        d = cfg.mask_downsample
        full = np.kron(mask, np.ones((d, d), bool))
        frac.setdefault(row.label, []).append(
            nuclear_fraction(rgb[: full.shape[0], : full.shape[1]][full])
        )
    assert np.mean(frac["subtype_a"]) > 1.5 * np.mean(frac["subtype_b"])
