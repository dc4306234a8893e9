"""Tile ground truth from masks, localisation AUC and heatmap drawing."""

import numpy as np
from PIL import Image

from wsimil.experiment.heatmaps import localisation_auc, save_heatmap, tile_tumour_share


def test_tile_share_from_mask():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 4:8] = True  # top-right quadrant; one mask pixel = 16 level-0 px
    coords = np.array([[64, 0], [0, 0], [32, 0], [64, 64]])  # tiles of 64 level-0 px
    share = tile_tumour_share(coords, 64, mask, 16)
    assert share.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_localisation_auc():
    share = np.array([1.0, 0.9, 0.0, 0.1, 0.4])
    assert localisation_auc(np.array([5, 4, 1, 2, 3]), share) == 1.0
    assert localisation_auc(np.array([1, 2, 5, 4, 3]), share) == 0.0
    assert np.isnan(localisation_auc(np.ones(3), np.zeros(3)))


def test_heatmap_is_written(tmp_path):
    thumb = np.full((64, 96, 3), 240, np.uint8)
    mask = np.zeros((16, 24), bool)
    mask[4:8, 4:8] = True
    path = tmp_path / "h.png"
    save_heatmap(path, thumb, 16, np.array([[0, 0], [512, 256]]), 256, np.array([0.1, 0.9]),
                 "t", mask=mask, mask_downsample=64)  # fmt: skip
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 50 and img.std() > 5  # something was drawn


def test_heatmap_with_legend_and_no_scores_leaves_only_the_picture(tmp_path):
    canvas = np.full((40, 80, 3), 255, np.uint8)
    for name, coords, scores in [("a", np.array([[0.0, 0.0], [64.0, 0.0]]), np.array([0.2, 0.2])),
                                 ("b", np.zeros((0, 2)), np.zeros(0))]:  # fmt: skip
        save_heatmap(tmp_path / "maps" / f"{name}.png", canvas, 2.0, coords, 64.0, scores, name,
                     legend="instance score: attention (20x tiles)")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.png", "b.png"]
