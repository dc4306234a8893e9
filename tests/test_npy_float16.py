"""float16 base64 .npy features: half the payload, checked like float32, the same answer."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest

from wsimil.serve.requests import Limits, RequestError, parse_bags

LIMITS = Limits(max_instances=100, max_bags=4, max_grid_cells=10_000)


def npy(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def parse(x: np.ndarray):
    table = pd.DataFrame([{"bag_id": "b", "features_20x_npy": npy(x)}])
    return parse_bags(table, ("20x",), (16,), LIMITS, needs_grid=False, slide_root=None)[0]


def test_float16_halves_the_payload_and_reads_as_its_float32_values():
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    half = x.astype(np.float16)
    assert len(npy(half)) < 0.55 * len(npy(x))
    got = parse(half).x[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, half.astype(np.float32))  # exact: float16 ⊂ float32


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_float16_non_finite_values_are_refused_naming_the_field(bad):
    x = np.zeros((5, 16), np.float16)
    x[2, 3] = bad
    with pytest.raises(RequestError, match=r"features_20x_npy has 1 NaN or infinite.*row 2"):
        parse(x)


def test_float16_with_the_wrong_width_is_refused_before_reading():
    with pytest.raises(RequestError, match="8-D features; this model reads 16-D"):
        parse(np.zeros((5, 8), np.float16))
