"""Loading the encoders an analysis compares: from finished ``histobench run``s, or from weights files.

A run is rebuilt from what it logged: the resolved encoder options in its ``config.json`` artifact, then the
weights of its nested ``pretrain`` run (``encoder/encoder.pt``). A run without pretraining (``--pretext
none``) evaluated the encoder as built after ``torch.manual_seed(seed)``; it is rebuilt the same way with the
run's seed. A weights file is a state dict of the named encoder (``histobench pretrain``'s ``encoder.pt``, or
``torch.save(module.state_dict())``), loaded strictly.

Every problem (an unknown run, a run without the artifact, weights that do not fit) is one
:class:`~histobench.errors.HistobenchError` line naming the run or the file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histobench.analyze.inputs import AnalysedEncoder
from histobench.components import Encoder
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

NO_PRETEXT = "none"


def _pixel_encoder(component: Encoder, what: str) -> None:
    if component.input_kind != "pixels":
        raise HistobenchError(f"{what}: encoder {component.name!r} takes {component.input_kind}, not pixel tiles; "
                              "analyses run on tile encoders")


def _load_state(module: "nn.Module", path: Path, what: str, encoder: str) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user mistake
        raise HistobenchError(f"{what} could not be read as a state dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise HistobenchError(f"{what} does not hold a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise HistobenchError(f"{what} does not fit encoder {encoder!r}: {str(err).strip().splitlines()[0]}") from None


def _ready(module: "nn.Module", device: "torch.device") -> "nn.Module":
    for p in module.parameters():
        p.requires_grad_(False)
    return module.to(device).eval()


def from_weights(path: Path, encoder: str, options: dict[str, Any] | None, device: "torch.device",
                 preset: str | None = None, seed: int = 0) -> AnalysedEncoder:
    """The encoder ``encoder`` (its ``preset``, then ``options``) with the state dict in ``path``."""
    import torch

    from histobench.registry import create

    path = Path(path)
    if not path.is_file():
        raise HistobenchError(f"weights file {path} does not exist")
    component = create("encoder", encoder, options, preset)
    _pixel_encoder(component, f"weights file {path}")
    torch.manual_seed(seed)
    module = component.build()
    _load_state(module, path, f"weights file {path}", encoder)
    return AnalysedEncoder(label=path.stem, module=_ready(module, device), component=component, source=str(path))


def _pretrain_child(run: dict[str, Any], tracking_uri: str | None) -> dict[str, Any] | None:
    """The nested ``pretrain`` run of a ``histobench run`` (the encoder's, not a region encoder's patch stage)."""
    from histobench.tracking import search_runs

    children = [r for r in search_runs(run["experiment"], tracking_uri, stage="pretrain")
                if r["tags"].get("mlflow.parentRunId") == run["run_id"]]
    main = [r for r in children if not str(r["name"]).startswith("pretrain patches")]
    return (main or children or [None])[0]


def from_run(run_id: str, device: "torch.device", tracking_uri: str | None = None) -> AnalysedEncoder:
    """The encoder of a finished ``histobench run``, rebuilt from its logged options and weights."""
    import torch

    from histobench.registry import create
    from histobench.tracking import PARENT_TAG, download_artifact, get_run

    run = get_run(run_id, tracking_uri)
    what = f"run {run_id}"
    stage = run["tags"].get(PARENT_TAG)
    if stage != "run":
        raise HistobenchError(f"{what} is a {stage or 'non-histobench'} run, not a `histobench run` "
                              "(pass the id of the parent run)")
    pretext = run["params"].get("run.pretext", "")
    if pretext.startswith("features:"):
        raise HistobenchError(f"{what} evaluated feature files ({pretext}); it has no encoder to analyse")
    with tempfile.TemporaryDirectory(prefix="histobench-analyze-") as tmp:
        try:
            config = json.loads(download_artifact(run_id, "config.json", Path(tmp), tracking_uri).read_text())
            options = dict(config["resolved"]["encoder"])
        except HistobenchError:
            raise HistobenchError(f"{what} has no config.json artifact (did it finish?)") from None
        except (ValueError, KeyError, TypeError):
            raise HistobenchError(f"{what}'s config.json has no resolved encoder options") from None
        name = options.pop("name")
        component = create("encoder", name, options)
        _pixel_encoder(component, what)
        seed = int(run["params"].get("run.seed", 0))
        torch.manual_seed(seed)
        module = component.build()
        if pretext != NO_PRETEXT:
            child = _pretrain_child(run, tracking_uri)
            if child is None:
                raise HistobenchError(f"{what} (pretext {pretext}) has no finished pretrain stage with encoder weights")
            try:
                weights = download_artifact(child["run_id"], "encoder/encoder.pt", Path(tmp), tracking_uri)
            except HistobenchError:
                raise HistobenchError(f"{what}: its pretrain run {child['run_id']} has no artifact encoder/encoder.pt") from None
            _load_state(module, weights, f"{what}'s encoder/encoder.pt", name)
    label = f"{run['name']}:{run_id[:8]}"
    return AnalysedEncoder(label=label, module=_ready(module, device), component=component, source=run_id, run_id=run_id)


def unique_labels(encoders: list[AnalysedEncoder]) -> list[AnalysedEncoder]:
    """Make labels unique in place (``a``, ``a#2``, ...): two files named ``encoder.pt`` stay apart."""
    seen: dict[str, int] = {}
    for e in encoders:
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] > 1:
            e.label = f"{e.label}#{seen[e.label]}"
    return encoders
