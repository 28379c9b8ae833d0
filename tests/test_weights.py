"""``histobench.weights.load_strict``: a weights file that does not fit an encoder is one line naming the keys."""

import pytest
import torch
from torch import nn

from histobench.errors import HistobenchError
from histobench.weights import load_strict, mismatch


def test_a_fitting_state_loads_and_every_kind_of_misfit_is_named():
    src, dst = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_strict(dst, src.state_dict(), "w.pt")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())

    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # a DataParallel prefix
    with pytest.raises(HistobenchError) as err:
        load_strict(dst, state, "weights file w.pt does not fit encoder 'timm'")
    text = str(err.value)
    assert "\n" not in text and text.startswith("weights file w.pt does not fit encoder 'timm': missing keys 0.weight, ")
    assert "(7 in all)" in text and "unexpected keys module.0.weight" in text

    wide = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict()
    assert mismatch(dst, wide).startswith("shapes differ: 0.weight (8, 3, 3, 3) vs (4, 3, 3, 3), 0.bias (8,) vs (4,), ...")
    assert mismatch(dst, src.state_dict()) == ""
    with pytest.raises(HistobenchError, match="w.pt: the file does not hold a state dict \\(got list\\)"):
        load_strict(dst, [1, 2], "w.pt")


def test_extract_with_weights_of_another_architecture_names_the_keys(tmp_path):
    import timm
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    result = CliRunner().invoke(build_app(), ["extract", "--task", "tcga-nsclc", "--demo", "--weights", str(path),
                                              "--workdir", str(tmp_path / "work")], env={"COLUMNS": "400"})
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: weights file {path} does not fit encoder 'timm': missing keys model.cls_token")
    assert "unexpected keys conv1.weight, bn1.weight, bn1.bias, ..." in line
    assert not (tmp_path / "work" / "features").exists()  # refused before any tiling or extraction
