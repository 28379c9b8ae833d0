"""The benchmark scripts run (``--quick``, CPU) and write the JSON their README describes.

Smoke runs only: their numbers are not checked against targets here (speed is measured on a GPU by the
scripts themselves, never by timed unit tests), but every reported rate must be a positive number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--device", "cpu",
                           "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout[proc.stdout.index("{"):])  # printed and written alike
    assert result["environment"]["device"] == "cpu" and result["commit"] and result["date"].startswith("20")
    return result


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_pretrain_speed_quick(tmp_path):
    r = _run("pretrain_speed", tmp_path)
    assert r["setting"]["quick"] is True and r["target_ratio"] == 0.9
    assert _positive(r["bare"]["images_per_second"]) and _positive(r["histobench"]["images_per_second"])
    assert r["ratio"] == pytest.approx(r["histobench"]["images_per_second"] / r["bare"]["images_per_second"])


def test_slpd_speed_quick(tmp_path):
    r = _run("slpd_speed", tmp_path)
    hb = r["histobench"]
    assert r["setting"]["cohort"] == "8 slides x 8 regions (64)"
    assert _positive(r["bare"]["regions_per_second"]) and _positive(hb["regions_per_second"])
    assert _positive(hb["cluster_seconds"]) and 0 < hb["cluster_share_of_full_epoch"] < 1
    assert hb["eligible_slides"] == 8  # every slide has >= n_min regions, so every slide was clustered
    assert r["ratio"] == pytest.approx(hb["regions_per_second"] / r["bare"]["regions_per_second"])


def test_extract_speed_quick(tmp_path):
    r = _run("extract_speed", tmp_path, "--slides-dir", str(tmp_path / "slides"))
    assert r["setting"]["tiles"] == r["histobench"]["tiles"] == r["histobench_openslide"]["tiles"] > 0
    assert r["clam_style"]["tiles"] == r["histobench"]["tiles"]
    for key in ("encoder_only_tiles_per_second", "decode_ceiling_tiles_per_second",
                "decode_ceiling_openslide_tiles_per_second"):
        assert _positive(r[key]), key
    assert r["ratio_vs_clam"] == pytest.approx(r["histobench"]["tiles_per_second"] / r["clam_style"]["tiles_per_second"])
    assert r["ceiling_is"] in ("encoder", "cpu_decode") and r["aligned"] is None  # the nvJPEG section is CUDA-only


def test_finetune_speed_quick(tmp_path):
    r = _run("finetune_speed", tmp_path)
    s = r["setting"]
    assert s["quick"] is True and (s["tile"], s["top_k"], s["slides_per_step"]) == (32, 8, 2)
    assert _positive(r["protocol"]["tiles_per_second"]) and _positive(r["bare"]["tiles_per_second"])
    assert r["protocol"]["batchnorm_layers_in_eval"] > 0  # ResNet18's BatchNorm layers stay in eval mode
    assert r["ratio"] == pytest.approx(r["protocol"]["tiles_per_second"] / r["bare"]["tiles_per_second"])


def test_dirl_speed_quick(tmp_path):
    r = _run("dirl_speed", tmp_path)
    assert r["setting"]["quick"] is True and r["setting"]["groups"] == 4
    assert _positive(r["dino"]["images_per_second"]) and _positive(r["dirl"]["images_per_second"])
    assert r["overhead"] == pytest.approx(r["dirl"]["seconds_per_step"] / r["dino"]["seconds_per_step"])
    assert 1 <= r["dirl"]["valid_groups_per_pair"] <= 4
    for name in ("oracle", "hed-watershed"):
        seg = r["segmentation"][name]
        assert seg["tiles"] > 0 and _positive(seg["tiles_per_second"]) and seg["failed"] == 0, name
    assert r["segmentation"]["oracle"]["nuclei_per_tile"] > 0


def test_hlss_speed_quick(tmp_path):
    r = _run("hlss_speed", tmp_path)
    s = r["setting"]
    assert s["quick"] is True and s["images_per_step"] == 16 and s["batch"] == "2 patients x 2 slides x 2 tiles x 2 views"
    assert _positive(r["bare"]["images_per_second"]) and _positive(r["histobench"]["images_per_second"])
    assert r["histobench"]["timed_steps"] == 2 and r["target_ratio"] == 0.9
    assert r["ratio"] == pytest.approx(r["histobench"]["images_per_second"] / r["bare"]["images_per_second"])
