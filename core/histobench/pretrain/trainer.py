"""The one pretraining loop. Every pretext runs here; none writes its own loop.

It owns: seeding (every step reseeds from ``(seed, step)``, so a resumed run repeats the uninterrupted loss
sequence exactly), device placement, bf16 autocast on CUDA, optional ``torch.compile``, AdamW (fused on
CUDA) with per-step cosine learning-rate and weight-decay schedules, gradient clipping, checkpoints with
resume, a stop on a non-finite loss that keeps the last good checkpoint, throughput and memory logging,
and data parallelism under ``torchrun`` (DistributedDataParallel).

One step synchronises the host with the device once: after backward, the step's scalars (loss and whatever
the pretext logs) are copied to the host in one transfer; a non-finite loss stops training there, before the
optimizer touches the weights, so the checkpoint on disk is the last good one.

Data parallelism is :class:`torch.nn.parallel.DistributedDataParallel`. A pretext owns its modules and
calls them itself (DINO's ``student.forward_views``, SLPD's region heads, a teacher that is not trained), so
the trainer wraps what it optimises, the pretext's ``student_modules()``, in one step module whose
``forward`` is the pretext's ``training_step``, and wraps that in DDP. Every step goes through the DDP
wrapper: DDP prepares its reducer in ``forward``, and the bucketed gradient all-reduce then overlaps the
backward pass. By default DDP walks each step's autograd graph to find trained parameters that got no
gradient (a pretext's steps may differ); a pretext whose steps always use the same parameters sets
``Pretext.ddp_static_graph`` and DDP learns the unused ones once, on the first step. The step's loss is averaged over ranks in one more (scalar)
all-reduce, so every rank logs the same loss and stops together on a non-finite one. Ranks start from
identical weights: the pretext's whole state (teacher and centres included) is broadcast from rank 0 after
``setup`` and after a resume.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histobench.components import CohortMeta, Encoder, PretrainContext, Pretext, TrainOptions
from histobench.device import channels_last, resolve_device
from histobench.errors import HistobenchError, disk_full_reason
from histobench.faults import fault_point
from histobench.pretrain.schedules import cosine_schedule
from histobench.reporting import Reporter

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(HistobenchError):
    """Training stopped on a NaN or infinite loss."""


@dataclass
class PretrainResult:
    encoder: Any  # nn.Module
    checkpoint: Path | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0
    resumed_from: int = 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed() -> tuple[int, int]:
    """Join the ``torchrun`` process group if the environment describes one; returns ``(rank, world)``."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The index batches of one epoch for one rank: a seeded permutation, dropped remainder, split over ranks."""
    from histobench.pretrain.samplers import TileSampler

    return TileSampler(n, batch_size, seed).batches(epoch, rank, world)


def batch_to_device(batch: Any, dev, input_key: str = "images", patient_of_slide: Any = None) -> dict[str, Any]:
    """The batch as a dict on ``dev``: ``(x, slide_index, tile_index)`` triples become
    ``{input_key, "slide_index", "tile_index"}``; every tensor moves (non-blocking); ``patient_index`` is added
    from ``patient_of_slide`` (a long tensor on ``dev``; without it each slide is its own patient)."""
    import torch

    if isinstance(batch, (tuple, list)):
        batch = dict(zip((input_key, "slide_index", "tile_index"), batch))
    out = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "patient_index" not in out and "slide_index" in out:
        out["patient_index"] = out["slide_index"] if patient_of_slide is None else patient_of_slide[out["slide_index"]]
    return out


def _param_groups(modules: dict[str, Any]):
    decay, no_decay = [], []
    seen = set()
    for module in modules.values():
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def _mean_over_ranks(loss):
    """The step's loss averaged over ranks (the gradients are averaged by DDP during backward)."""
    dist = _dist()
    if dist is None:
        return loss
    mean = loss.detach().float().reshape(1).clone()
    dist.all_reduce(mean)
    return mean[0] / dist.get_world_size()


def _data_parallel_step(pretext: Pretext, modules: dict[str, Any], dev):
    """``training_step`` of ``pretext``, through DistributedDataParallel when running under ``torchrun``.

    Returns a callable ``(batch, step) -> output dict``. Outside a process group it is the pretext's own
    ``training_step``. Inside one, the trained modules are collected in a step module whose ``forward``
    calls ``training_step``; DDP wraps that module, so its gradient hooks fire on the pretext's own module
    calls. The pretext is not a submodule: its state dict, checkpoints and the modules it calls are
    unchanged.
    """
    dist = _dist()
    if dist is None:
        return pretext.training_step
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class _StepModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleDict({k.replace(".", "_"): m for k, m in modules.items()})

        def forward(self, batch, step):
            return pretext.training_step(batch, step)

    step_module = _StepModule()
    if not any(p.requires_grad for p in step_module.parameters()):
        raise HistobenchError(f"pretext {pretext.name!r} has no trainable parameters in student_modules()")
    kwargs: dict[str, Any] = {"static_graph": True} if pretext.ddp_static_graph else {"find_unused_parameters": True}
    # Buffers start identical (rank-0 broadcast) and are never trained: no per-forward buffer sync.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(step_module, device_ids=device_ids, **kwargs)


def _broadcast_state(obj: Any) -> None:
    """Broadcast every tensor of a (nested) state dict from rank 0 in place: all ranks start identical."""
    dist = _dist()
    if dist is None:
        return
    import torch

    if isinstance(obj, torch.Tensor):
        dist.broadcast(obj.data if obj.requires_grad else obj, src=0)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _broadcast_state(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _broadcast_state(v)


def _oom_message(opts: TrainOptions, where: str) -> str:
    return (f"CUDA ran out of memory in the {where} at train.batch_size={opts.batch_size}; lower it, "
            f"e.g. -o train.batch_size={max(opts.batch_size // 2, 1)}")


def _load_checkpoint(path: Path, dev, reporter: Reporter) -> dict[str, Any] | None:
    """A checkpoint's tensors and plain data (``weights_only``: a checkpoint in a shared workdir never runs code);
    an unreadable one is reported and training starts over rather than trusting it."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location=dev, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reporter.warn(f"ignoring checkpoint {path}: it cannot be read as tensors and plain data ({first[:200]})")
        return None
    if not isinstance(state, dict) or "step" not in state:
        reporter.warn(f"ignoring checkpoint {path}: it is not a histobench training checkpoint")
        return None
    return state


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then a rename: a crash leaves the old file or the new
    one under ``path``, never a half-written one (a reader still checks, see :func:`_load_checkpoint`).

    With a fault armed (:mod:`histobench.faults`) the bytes are made in memory first, so that the process can
    die with exactly half of them in the temporary file (``pretrain.checkpoint_half``) or with all of them
    there, not yet renamed (``pretrain.checkpoint_rename``)."""
    import torch

    from histobench.faults import armed, fault_point

    tmp = path.with_name(path.name + ".tmp")
    if armed("pretrain.checkpoint_half"):
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            fault_point("pretrain.checkpoint_half")
            fh.write(data[len(data) // 2:])
    else:
        torch.save(obj, tmp)
    fault_point("pretrain.checkpoint_rename")
    os.replace(tmp, path)


_save_atomic = save_atomic


def write_error(path: Path, err: BaseException, kept: str, what: str = "checkpoint") -> HistobenchError:
    """One line for a checkpoint that could not be written (a full disk, a file-size limit, a lost mount).

    ``torch.save`` reports a short write as a bare ``RuntimeError`` of its zip writer, so that case is named
    as a write failure too. The half-written temporary file is removed; the file under ``path`` is untouched.
    """
    for tmp in (path.with_name(path.name + ".tmp"), path.with_suffix(".tmp")):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    full = disk_full_reason(err) if isinstance(err, OSError) else None
    if full is not None:
        why = full
    elif isinstance(err, OSError):
        why = err.strerror or str(err)
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = f"the write failed ({first[:160]}){_space_note(path)}"
    return HistobenchError(f"cannot write {what} {path}: {why}; {kept}")


def _space_note(path: Path) -> str:
    """Why a write may have failed: a file-size limit of this process, or little free space on the disk."""
    import resource
    import shutil

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return f"; this process may write files of at most {soft} bytes (ulimit -f)"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return "; is the disk full?"
    return f"; {free / 2**20:.0f} MiB free on its disk"


def pretrain(
    pretext: Pretext,
    encoder_component: Encoder,
    dataset: Any,
    opts: TrainOptions,
    *,
    out_dir: Path,
    seed: int = 0,
    device: str | None = None,
    reporter: Reporter | None = None,
    tracker: Any = None,
    resume: bool = True,
    max_steps: int | None = None,
    cohort: CohortMeta | None = None,
    text_encoder: Any = None,
    segmentation: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> PretrainResult:
    """Train ``pretext`` on ``dataset``.

    The dataset yields ``(x, slide_index, tile_index)`` triples or dicts (see :class:`~histobench.components.Pretext`
    for what batches hold). ``x`` is a uint8 tile ``[3, S, S]``, or whatever the dataset's ``input_key``
    attribute names (``grids``: float patch-embedding grids ``[D, h, w]`` for region-level pretexts).
    ``cohort`` names the dataset's slides and their patients (default: one patient per slide);
    ``text_encoder``, ``segmentation`` and ``cache_dir`` are handed to the pretext in its context.

    ``out_dir`` holds ``checkpoint.pt``; with ``resume`` an existing checkpoint there is continued.
    ``max_steps`` stops early (used to test resume); the schedules still span the full run.
    """
    import torch

    reporter = reporter or Reporter()
    rank, world = init_distributed()
    dev = resolve_device(device)
    if opts.batch_size % world:
        raise HistobenchError(f"train.batch_size={opts.batch_size} is not divisible by the {world} ranks")
    input_key = getattr(dataset, "input_key", "images")
    if cohort is None:
        n_slides = int(np.max(dataset.slide_index)) + 1 if len(dataset) else 0
        cohort = CohortMeta.one_patient_per_slide(n_slides)
    sampler = pretext.batch_sampler(dataset, cohort, opts.batch_size, seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        have = len(getattr(sampler, "patients", ())) if sampler.unit == "patients" else len(dataset)
        raise HistobenchError(
            f"only {have} training {sampler.unit} for train.batch_size={opts.batch_size}: lower train.batch_size or add slides"
        )
    if opts.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, opts.steps_per_epoch)
    total = steps_per_epoch * opts.epochs

    torch.manual_seed(seed)
    encoder = channels_last(encoder_component.build().to(dev), dev)
    if opts.compile:
        # In place (nn.Module.compile): state-dict keys, attributes and deep copies (a teacher) stay as they are.
        encoder.compile()
    ctx = PretrainContext(device=dev, total_steps=total, steps_per_epoch=steps_per_epoch, epochs=opts.epochs,
                          batch_size=opts.batch_size, encoder_component=encoder_component, seed=seed,
                          world_size=world, rank=rank, cohort=cohort, text_encoder=text_encoder,
                          segmentation=dict(segmentation or {}), cache_dir=cache_dir)
    pretext.setup(encoder, ctx)
    modules = pretext.student_modules()
    groups = _param_groups(modules)
    params = [p for g in groups for p in g["params"]]
    lr_peak = opts.lr * opts.batch_size / 256.0
    lr_sched = cosine_schedule(lr_peak, opts.min_lr, total, int(opts.warmup_epochs * steps_per_epoch))
    wd_sched = cosine_schedule(opts.weight_decay, opts.weight_decay_end, total)
    fused = dev.type == "cuda"
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "apply_wd"} for g in groups],
                                  lr=lr_peak, fused=fused)
    use_bf16 = opts.precision == "bf16" or (opts.precision == "auto" and dev.type == "cuda")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    start = 0
    history: list[dict[str, float]] = []
    if resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, dev, reporter)
        if state is not None and state.get("total_steps") == total and state["step"] <= total:
            pretext.load_state_dict(state["pretext"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
            history = list(state.get("history", []))
            reporter.info(f"resuming pretraining from step {start}/{total} ({ckpt_path})")
        elif state is not None:
            reporter.warn(f"ignoring checkpoint {ckpt_path}: it was made for a different schedule")
    _broadcast_state(pretext.state_dict())
    step_fn = _data_parallel_step(pretext, modules, dev)

    last_saved = start
    last_good = start if ckpt_path.exists() else 0  # the step of the checkpoint on disk

    def save(step: int) -> None:
        nonlocal last_saved, last_good
        if step == last_saved:  # the step-interval and the epoch-end checkpoint can fall on the same step
            return
        last_saved = step
        if rank == 0:
            kept = f"the checkpoint of step {last_good} is kept" if last_good else "no checkpoint was written before"
            try:
                _save_atomic({"pretext": pretext.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "total_steps": total, "history": history, "train_options": opts.model_dump()}, ckpt_path)
            except (OSError, RuntimeError) as err:
                raise write_error(ckpt_path, err, kept) from err
        last_good = step

    stop = total if max_steps is None else min(total, max_steps)
    step = start
    images_seen, t_start = 0, time.perf_counter()
    done_note = f" (from step {start})" if start else ""
    # The bar counts the images of this session only, so that its rate and ETA are right after a resume.
    images_per_batch = sampler.images_per_batch
    patient_of_slide = torch.as_tensor(cohort.patient_index, device=dev)
    # a pretext's own collate only when it has one: the default needs no pickled pretext in the workers
    collate = pretext.collate if type(pretext).collate is not Pretext.collate else None
    with reporter.stage(f"pretrain {pretext.name}{done_note}", total=max(stop - start, 0) * images_per_batch,
                        unit="img") as st:
        epoch = start // steps_per_epoch
        while step < stop:
            diag = pretext.on_epoch_start(epoch, dataset)
            if diag and tracker is not None:
                tracker.metrics({f"epoch/{k}": v for k, v in diag.items()}, step=epoch)
            batches = sampler.batches(epoch, rank, world)[:steps_per_epoch]
            first = step - epoch * steps_per_epoch
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches[first:], num_workers=opts.num_workers,
                collate_fn=collate, pin_memory=dev.type == "cuda", persistent_workers=False,
                prefetch_factor=4 if opts.num_workers else None,
            )
            epoch_losses = []
            for raw in loader:
                if step >= stop:
                    break
                torch.manual_seed(seed * 1_000_003 + step)
                for i, g in enumerate(optimizer.param_groups):
                    g["lr"] = float(lr_sched[step])
                    if groups[i]["apply_wd"]:
                        g["weight_decay"] = float(wd_sched[step])
                batch = batch_to_device(raw, dev, input_key, patient_of_slide)
                n_images = len(batch[input_key])
                where = "forward pass"
                try:
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                        out = step_fn(batch, step)
                    where = "backward pass"
                    optimizer.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    mean_loss = _mean_over_ranks(out["loss"])
                    # One host sync per step: every scalar to log, and the loss the stop decision uses.
                    keys, values = _scalar_tensors(out)
                    host = torch.stack([mean_loss.detach().float().reshape(())] + values).cpu().tolist()
                    loss_value, logged = host[0], dict(zip(keys, host[1:]))
                    logged.update(_plain_scalars(out))
                    logged["loss"] = loss_value
                    if not np.isfinite(loss_value):
                        kept = f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss_value}) at step {step} (epoch {epoch}) of pretext {pretext.name!r}; "
                            f"{kept}; try a lower train.lr"
                        )
                    where = "optimizer step"
                    if opts.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(params, opts.clip_grad)
                    pretext.before_optimizer_step(step)
                    optimizer.step()
                    pretext.after_optimizer_step(step)
                except torch.cuda.OutOfMemoryError:
                    raise HistobenchError(_oom_message(opts, where)) from None
                step += 1
                images_seen += n_images * world
                logged["lr"] = float(lr_sched[step - 1])
                logged["weight_decay"] = float(wd_sched[step - 1])
                epoch_losses.append(logged["loss"])
                history.append({"step": step - 1, **logged})
                st.advance(n_images * world)
                st.set(loss=logged["loss"], epoch=epoch)
                fault_point("pretrain.step")
                if tracker is not None and (step % 10 == 0 or step == stop):
                    m = {f"train/{k}": v for k, v in logged.items()}
                    m["train/images_per_second"] = images_seen / max(time.perf_counter() - t_start, 1e-9)
                    if dev.type == "cuda":
                        m["train/max_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                    tracker.metrics(m, step=step - 1)
                if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                    save(step)
            if step % steps_per_epoch == 0 or step == stop:
                save(step)
            elapsed = time.perf_counter() - t_start
            if tracker is not None and epoch_losses:
                m = {"epoch/loss": float(np.mean(epoch_losses)), "epoch/images_per_second": images_seen / max(elapsed, 1e-9)}
                if dev.type == "cuda":
                    m["epoch/max_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                tracker.metrics(m, step=epoch)
            epoch += 1
    dist = _dist()
    if dist is not None:
        dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
    ips = images_seen / max(time.perf_counter() - t_start, 1e-9)
    return PretrainResult(encoder=pretext.trained_encoder(), checkpoint=ckpt_path if ckpt_path.exists() else None,
                          steps=step, history=history, images_per_second=ips, resumed_from=start)


def _scalar_tensors(out: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """The one-element tensors of a ``training_step`` result other than ``loss``, as 0-d float tensors."""
    keys, values = [], []
    for k, v in out.items():
        if k != "loss" and hasattr(v, "detach") and v.numel() == 1:
            keys.append(k)
            values.append(v.detach().float().reshape(()).to(out["loss"].device))
    return keys, values


def _plain_scalars(out: dict[str, Any]) -> dict[str, float]:
    """The Python-number entries of a ``training_step`` result, as floats."""
    return {k: float(v) for k, v in out.items() if k != "loss" and isinstance(v, (int, float)) and not isinstance(v, bool)}
