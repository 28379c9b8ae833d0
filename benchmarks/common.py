"""Shared helpers of the speed benchmarks: device description, provenance, timing, JSON output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from histobench.device import resolve_device  # noqa: F401  (re-exported for the benchmark scripts)


def describe_device(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (the GPU machine's)
        return os.environ.get("HISTOBENCH_COMMIT") or "unknown"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], Any], device, warmup: int, steps: int) -> float:
    """Seconds per call of ``step`` over ``steps`` calls after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def finish(result: dict[str, Any], device, out: Path | None) -> dict[str, Any]:
    """Add provenance, print the JSON, and write it to ``out`` (unless ``None``)."""
    result = {**result, "environment": describe_device(device), "commit": git_commit(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


def step_clock():
    """A silent :class:`histobench.reporting.Reporter` that records the time of every progress step.

    The trainer advances its progress bar once per step, so ``clock.ticks`` are step end times and
    ``clock.timing(after)`` times the steps after the first ``after`` of them.
    """
    from histobench.reporting import Reporter

    class StepClock(Reporter):
        def __init__(self):
            super().__init__()
            self.ticks: list[float] = []

        def _advance(self, stage, n):
            self.ticks.append(time.perf_counter())

        def timing(self, after: int) -> tuple[int, float]:
            """``(steps, seconds)`` of the steps after the first ``after`` (timed from the end of step ``after``)."""
            ticks = self.ticks[after - 1:] if after else self.ticks
            return len(ticks) - 1, ticks[-1] - ticks[0]

    return StepClock()


def peak_memory(device) -> dict[str, float]:
    """``{"max_memory_gb": ...}`` on CUDA (the allocator's peak since the last reset), else ``{}``."""
    if device.type != "cuda":
        return {}
    import torch

    return {"max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def bare_setup(pre, enc, a, device):
    """A pretext set up outside the trainer for a bare-step baseline: its encoder built on ``device`` (compiled
    with ``a.compile``), ``setup`` for ``a.warmup + a.steps`` steps, and an AdamW over its student modules
    with the trainer's parameter groups (fused on CUDA). Returns ``(params, optimizer)``."""
    import torch

    from histobench.components import PretrainContext
    from histobench.pretrain.trainer import _param_groups

    torch.manual_seed(0)
    encoder = enc.build().to(device)
    if a.compile:
        encoder.compile()
    total = a.warmup + a.steps
    pre.setup(encoder, PretrainContext(device=device, total_steps=total, steps_per_epoch=total, epochs=1,
                                       batch_size=a.batch_size, encoder_component=enc))
    groups = _param_groups(pre.student_modules())
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "apply_wd"} for g in groups], lr=1e-4,
                            fused=device.type == "cuda")
    return params, opt


def speed_parser(doc: str | None, quick_help: str):
    """The argument parser every speed benchmark starts from: ``--device`` and ``--quick`` (a CPU smoke run,
    which the test suite and the device suite's dry run use); the script adds its sizes, then
    :func:`add_run_options`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def add_run_options(ap, name: str, warmup: int, steps: int, workers: int | None = 4,
                    compile_help: str | None = None) -> None:
    """``--workers`` (the trainer's DataLoader workers; None: the script has none), ``--warmup``/``--steps``
    (untimed and timed steps), ``--compile`` (when ``compile_help`` says what is compiled) and ``--out``
    (``results/<name>.json``)."""
    if workers is not None:
        ap.add_argument("--workers", type=int, default=workers, help="DataLoader workers of the trainer.")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--steps", type=int, default=steps)
    if compile_help:
        ap.add_argument("--compile", action="store_true", help=compile_help)
    ap.add_argument("--out", type=Path, default=Path(f"results/{name}.json"))


def release_cuda(device) -> None:
    """Between the two sides of a comparison: the first side's cached blocks go back to the driver."""
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
