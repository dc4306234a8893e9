"""prefect.yaml (deployments for a GPU work pool) parses, and its flows take its parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_is_a_valid_deployment_file(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert [d.name for d in model.deployments] == ["wsimil-features-gpu", "wsimil-tiles-gpu"]
    assert {d.work_pool.name for d in model.deployments} == {"wsimil-gpu"}


def test_every_entrypoint_imports_and_its_parameters_validate(prefect_yaml, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    from wsimil.config import FeaturesConfig, TilesConfig

    monkeypatch.chdir(REPO)  # entrypoints are relative to the repository root
    for deployment in prefect_yaml["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        params = flow.validate_parameters(deployment["parameters"])  # raises on a bad key
        assert isinstance(params["tiles"], TilesConfig)
        assert params["tiles"].slides_csv == Path("/work/data/demo/slides.csv")
        if "features" in params:
            assert isinstance(params["features"], FeaturesConfig)
            assert params["features"].device == "auto"  # CUDA on the GPU machine


def test_a_misspelt_parameter_fails_validation(prefect_yaml, monkeypatch):
    from prefect.exceptions import ParameterTypeError
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    deployment = prefect_yaml["deployments"][0]
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    bad = {**deployment["parameters"], "features": {"num_worker": 4}}
    with pytest.raises(ParameterTypeError, match="num_worker"):
        flow.validate_parameters(bad)
