"""Serve every wsimil flow as a Prefect deployment, so the Prefect UI can start them.

    prefect server start --host 127.0.0.1          # in one shell (UI: http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deploy.py                          # in another, from the project folder
    python flows/deploy.py --params /data/study/params.yaml   # or for another project

The extraction deployments default to the tiles/features sections of params.yaml (read
through the CLI's loader, so every path, and an extractor or weights file, is absolute),
so pressing Run does what `dvc repro` would; the model-side deployments default to that
project's folder. Every parameter can be changed in the form.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def deployments(params_path: Path = ROOT / "params.yaml") -> list:
    """One deployment per flow, tagged ``wsimil``."""
    from train import crossval_flow, pipeline_flow, register_flow, tune_flow

    from wsimil.cli.options import project
    from wsimil.extract.flows import extract_features, select_tiles

    params, root = project(params_path)  # every path absolute under the project root
    tiles, feats = params.tiles, params.features
    here = {"project": str(root)}
    return [
        select_tiles.to_deployment(
            "wsimil-tiles", parameters={"tiles": tiles.model_dump(mode="json")}, tags=["wsimil"]
        ),
        extract_features.to_deployment(
            "wsimil-features",
            parameters={
                "tiles": tiles.model_dump(mode="json"),
                "features": feats.model_dump(mode="json"),
            },
            tags=["wsimil"],
        ),
        crossval_flow.to_deployment("wsimil-crossval", parameters=here, tags=["wsimil"]),
        tune_flow.to_deployment("wsimil-tune", parameters=here, tags=["wsimil"]),
        register_flow.to_deployment("wsimil-register", parameters=here, tags=["wsimil"]),
        pipeline_flow.to_deployment("wsimil-pipeline", parameters=here, tags=["wsimil"]),
    ]


if __name__ == "__main__":
    import argparse

    from prefect import serve

    parser = argparse.ArgumentParser(description="Serve the wsimil flows as deployments.")
    parser.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="the project's params.yaml"
    )
    serve(*deployments(parser.parse_args().params))
