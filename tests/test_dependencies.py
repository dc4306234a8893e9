"""The locked dependency set installs and imports together in the venv."""

import importlib

import pytest

MODULES = [
    "timm",
    "torchvision",
    "torch",
    "mlflow",
    "prefect",
    "dvc",
    "optuna",
    "ot",
    "openslide",
    "sklearn",
    "pandas",
    "h5py",
]


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    importlib.import_module(name)


def test_torchvision_ops_work_with_this_torch():
    """A torch/torchvision mismatch fails here ('operator torchvision::nms does not exist')."""
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), iou_threshold=0.5)
    assert keep.tolist() == [0]


def test_timm_builds_a_model_offline():
    import timm
    import torch

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 512)


def test_pinned_versions_match_the_lock(repo_root):
    """What is installed is what requirements.lock says (nothing swapped torch later)."""
    from importlib.metadata import version

    pins = {}
    for line in (repo_root / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            pins[name.strip().lower()] = ver.strip()
    for name in ["torch", "torchvision", "timm", "mlflow", "prefect", "fastapi"]:
        assert version(name).split("+")[0] == pins[name], name
