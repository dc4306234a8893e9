"""Region scores: each scale's tiles get the other scale's share of the same tissue."""

import numpy as np

from wsimil.experiment.regions import parents, region_scores


def test_a_20x_tile_belongs_to_the_10x_tile_holding_its_centre():
    coords10 = np.array([[0, 0], [512, 0]])  # 10x tiles of 512 level-0 px
    coords20 = np.array([[0, 0], [256, 256], [512, 0], [768, 256], [2000, 2000]])
    assert parents(coords10, 512, coords20, 256).tolist() == [0, 0, 1, 1, -1]


def test_region_scores_share_the_parent_and_keep_the_total():
    coords10 = np.array([[0, 0], [512, 0]])
    coords20 = np.array([[0, 0], [256, 256], [512, 0], [2000, 2000]])
    s10, s20 = np.array([4.0, -2.0]), np.array([1.0, 3.0, 0.5, 7.0])
    r10, r20 = region_scores((s10, s20), (coords10, coords20), (512.0, 256.0))
    assert r10.tolist() == [4.0 + 1.0 + 3.0, -2.0 + 0.5]  # a parent adds its children
    assert r20.tolist() == [1.0 + 2.0, 3.0 + 2.0, 0.5 - 2.0, 7.0]  # a child: its parent's share
    assert r10.sum() + r20[-1] == s10.sum() + s20.sum() == r20.sum()  # nothing made or lost
