"""synth.twoscale: each positive's evidence lies at one scale only, by construction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from wsimil.config import SynthConfig
from wsimil.synth import _pyramid, plan_cohort, write_cohort
from wsimil.synth_twoscale import layout, render_slide

CFG = SynthConfig(
    twoscale=True, width_px=768, height_px=512, n_slides=4, n_patients=4, tumour_share=0.3,
    twoscale_cell_px=32,
)  # fmt: skip


def _slide(lesion: str):
    (spec,) = [s for s in plan_cohort(CFG) if s.lesion == lesion][:1]
    return spec


def test_positives_alternate_the_two_lesions_and_negatives_have_none():
    specs = plan_cohort(CFG.model_copy(update={"n_slides": 12, "n_patients": 12}))
    lesions = [s.lesion for s in specs if s.label == "tumour"]
    assert lesions == ["fine", "architecture"] * (len(lesions) // 2) + ["fine"] * (len(lesions) % 2)
    assert all(s.lesion is None and s.tumour is None for s in specs if s.label == "normal")


def test_the_fine_lesion_is_at_20x_only():
    spec = _slide("fine")
    rgb, mask, share = render_slide(spec, CFG)
    twin, twin_mask, _ = render_slide(replace(spec, lesion=None), CFG)
    assert mask.any() and not twin_mask.any() and share > 0.05
    changed = (rgb != twin).any(-1)
    assert changed.mean() > 0.02, "the texture is drawn at 20x"
    _, lesion, _ = layout(np.random.default_rng(spec.seed), spec, CFG)
    assert not (changed & ~lesion).any(), "only the lesion's pixels change"
    assert np.array_equal(_pyramid(rgb, 2)[1], _pyramid(twin, 2)[1]), "10x: the same pixels"


def test_the_architecture_lesion_alternates_whole_20x_tiles():
    spec = _slide("architecture")
    _, lesion, collagen = layout(np.random.default_rng(spec.seed), spec, CFG)
    c = CFG.twoscale_cell_px
    h, w = lesion.shape[0] // (2 * c) * 2 * c, lesion.shape[1] // (2 * c) * 2 * c
    inside = lesion[:h, :w].reshape(h // c, c, w // c, c).all(axis=(1, 3))  # whole 20x tiles
    cells = collagen[:h, :w].reshape(h // c, c, w // c, c)
    pure = cells.all(axis=(1, 3)) | ~cells.any(axis=(1, 3))
    assert inside.sum() >= 4 and pure[inside].all(), "a 20x tile holds one compartment"
    blocks = inside.reshape(h // (2 * c), 2, w // (2 * c), 2).all(axis=(1, 3))  # 10x tiles
    share = cells.mean(axis=(1, 3)).reshape(h // (2 * c), 2, w // (2 * c), 2).mean(axis=(1, 3))
    assert blocks.any() and (share[blocks] == 0.5).all(), "a 10x tile shows both, alternating"
    _, _, plain = layout(np.random.default_rng(spec.seed), replace(spec, lesion=None), CFG)
    assert np.array_equal(collagen[~lesion], plain[~lesion]), "outside the lesion: unchanged"


def test_the_cohort_lists_each_slides_lesion(tmp_path):
    table = write_cohort(
        CFG.model_copy(update={"n_slides": 2, "n_patients": 2, "seed": 1}), tmp_path
    )
    again = pd.read_csv(tmp_path / "slides.csv", keep_default_na=False)
    assert list(again["lesion"]) == list(table["lesion"])
    assert set(again.loc[again["label"] == "tumour", "lesion"]) <= {"fine", "architecture"}
    assert set(again.loc[again["label"] == "normal", "lesion"]) == {""}


def test_twoscale_is_off_by_default_and_binary_only():
    assert SynthConfig().twoscale is False
    with pytest.raises(ValueError, match="synth.twoscale needs mode: binary"):
        SynthConfig(twoscale=True, mode="subtypes")
