"""Region tiling tells a slide smaller than one region apart from a slide without tissue (issue 16)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app
from histobench.errors import HistobenchError
from histobench.features.regions import region_tiles


class FakeSlide:
    """Just what the size check reads: level-0 dimensions and µm/px."""

    slide_id = "tiny"

    def __init__(self, w: int, h: int, mpp: float):
        self.dimensions, self.mpp = (w, h), mpp


@pytest.mark.parametrize("size", [(1000, 5000), (5000, 1000)])
def test_region_tiles_names_the_sizes(size):
    # 0.25 µm/px level 0 seen at 0.5 µm/px: 500 x 2500 px against a 16 x 64 = 1024 px region
    with pytest.raises(HistobenchError) as err:
        region_tiles(FakeSlide(*size, mpp=0.25), patch_mpp=0.5, patch_px=64, grid=16, min_tissue=0.5)
    w, h = size[0] // 2, size[1] // 2
    assert str(err.value) == f"slide smaller than one region ({w}×{h} px at 0.5 µm/px vs a region of 1024 px)"


def test_cli_status_table_and_error_give_the_region_reason(tmp_path):
    """Demo slides of 512 px at 0.25 µm/px against regions of 8 x 128 = 1024 px: none fits, all are recorded."""
    work = tmp_path / "work"
    result = CliRunner().invoke(build_app(), [
        "extract", "--task", "tcga-nsclc", "--encoder", "hipt-vit4k", "--demo", "--workdir", str(work),
        "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=512", "-o", "encoder.patch_px=128"],
        env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    reason = "slide smaller than one region (512×512 px at 0.25 µm/px vs a region of 1024 px)"
    status = pd.read_csv(work / "status.csv")
    assert len(status) >= 4 and set(status["stage"]) == {"regions"} and set(status["status"]) == {"skipped"}
    assert set(status["reason"]) == {reason}
    assert "no tissue region" not in result.output and f"(regions): {reason}" in result.output
    # `run --fail-fast` stops at the first slide with the same reason as its error
    stopped = CliRunner().invoke(build_app(), [
        "run", "--task", "tcga-nsclc", "--encoder", "hipt-vit4k", "--demo", "--workdir", str(work), "--fail-fast",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=512", "-o", "encoder.patch_px=128"],
        env={"COLUMNS": "300"})
    assert stopped.exit_code == 2 and f"(regions): {reason} (--fail-fast)" in stopped.output
