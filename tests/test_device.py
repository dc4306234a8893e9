"""The one device rule (wsimil.device): its error names the setting to change."""

from __future__ import annotations

import pytest
import torch

from wsimil.device import DeviceError, resolve_device


def test_auto_and_cpu_resolve_to_a_device():
    assert resolve_device("cpu", "train.device") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", "train.device") == torch.device(want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_the_setting_in_each_stage(tmp_path):
    from wsimil.config import FeaturesConfig, TrainConfig
    from wsimil.extract.extractors import ExtractorError, build_extractor
    from wsimil.serve.fold_ensemble import EnsembleError, FoldEnsemble
    from wsimil.train.fit import resolve_device as train_device

    with pytest.raises(DeviceError, match=r"serve\.device is 'cuda'.*set serve\.device to auto"):
        resolve_device("cuda", "serve.device")
    with pytest.raises(DeviceError, match=r"train\.device is 'cuda'"):
        train_device(TrainConfig(device="cuda").device)
    with pytest.raises(ExtractorError, match=r"features\.device is 'cuda'"):
        build_extractor(FeaturesConfig(extractor="resnet18", weights="random", device="cuda"), 32)
    (tmp_path / "ensemble.json").write_text(
        '{"family": "abmil", "model": {}, "scales": ["20x"], "in_dims": [4], '
        '"classes": ["a", "b"], "folds": []}'
    )
    with pytest.raises(EnsembleError, match=r"serve\.device is 'cuda'"):
        FoldEnsemble.load(tmp_path, "cuda")
