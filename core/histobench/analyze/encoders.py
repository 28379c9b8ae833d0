"""Loading the encoders an analysis compares: from finished ``histobench run``s, or from weights files.

A run is rebuilt from what it logged: the resolved encoder options in its ``config.json`` artifact, then the
weights of its nested ``pretrain`` run (``encoder/encoder.pt``). A run without pretraining (``--pretext
none``) evaluated the encoder as built after ``torch.manual_seed(seed)``; it is rebuilt the same way with the
run's seed. ``RUN_ID:foldK`` names instead the encoder a protocol fine-tuned in fold ``K`` of that run
(``topk-finetune`` keeps it as the artifact ``protocol/foldK/encoder.pt``; ``RUN_ID:foldK:seedS`` for the
``S``-th repeat of ``eval.seeds``), so that HistoTransfer's question, which layers did fine-tuning change
(Sharma et al., IEEE BHI 2021), is ``--run RUN_ID --run RUN_ID:foldK``: the initialisation against the tuned
encoder. A weights file is a state dict of the named encoder (``histobench pretrain``'s ``encoder.pt``, or
``torch.save(module.state_dict())``), loaded strictly.

Every problem (an unknown run, a run without the artifact, weights that do not fit) is one
:class:`~histobench.errors.HistobenchError` line naming the run or the file.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histobench.analyze.inputs import AnalysedEncoder
from histobench.components import Encoder
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

NO_PRETEXT = "none"
_RUN_REF = re.compile(r"^(?P<run>[^:\s]+)(?::fold(?P<fold>\d+)(?::seed(?P<seed>\d+))?)?$")


@dataclass(frozen=True)
class RunRef:
    """A ``--run`` value: a run id, and optionally the fold (and seed repeat) whose fine-tuned encoder to load."""

    run_id: str
    fold: int | None = None
    seed: int = 0

    @property
    def artifact(self) -> str:
        """The fold's fine-tuned weights as ``topk-finetune`` logs them (``protocol/foldK[/seedS]/encoder.pt``)."""
        return f"protocol/fold{self.fold}/" + (f"seed{self.seed}/" if self.seed else "") + "encoder.pt"

    @property
    def suffix(self) -> str:
        return "" if self.fold is None else f":fold{self.fold}" + (f":seed{self.seed}" if self.seed else "")


def parse_run_ref(text: str) -> RunRef:
    """``RUN_ID``, ``RUN_ID:foldK`` or ``RUN_ID:foldK:seedS``; anything else is a one-line error."""
    m = _RUN_REF.match(str(text).strip())
    if not m:
        raise HistobenchError(f"--run {text!r} is not RUN_ID, RUN_ID:foldK or RUN_ID:foldK:seedS")
    return RunRef(m["run"], None if m["fold"] is None else int(m["fold"]), int(m["seed"] or 0))


def _tuned_folds(run_id: str, tracking_uri: str | None) -> list[str]:
    """The ``foldK`` (and ``foldK:seedS``) entries of a run whose fine-tuned encoder was logged."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    found = []
    try:
        for d in client.list_artifacts(run_id, "protocol"):
            name = d.path.rsplit("/", 1)[-1]
            if not (d.is_dir and re.fullmatch(r"fold\d+", name)):
                continue
            for f in client.list_artifacts(run_id, d.path):
                leaf = f.path.rsplit("/", 1)[-1]
                if leaf == "encoder.pt":
                    found.append(name)
                elif f.is_dir and re.fullmatch(r"seed\d+", leaf):
                    if any(g.path.endswith("/encoder.pt") for g in client.list_artifacts(run_id, f.path)):
                        found.append(f"{name}:{leaf}")
    except Exception:  # noqa: BLE001 - an unreadable store only makes the hint shorter
        return found
    return sorted(found, key=lambda t: [int(x) for x in re.findall(r"\d+", t)])


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
    from histobench.weights import load_strict

    load_strict(module, state, f"{what} does not fit encoder {encoder!r}")


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
    """The encoder of a finished ``histobench run``, rebuilt from its logged options and weights; with a
    ``:foldK[:seedS]`` suffix (:func:`parse_run_ref`), the encoder its protocol fine-tuned in that fold."""
    import torch

    from histobench.registry import create
    from histobench.tracking import PARENT_TAG, download_artifact, get_run

    ref = parse_run_ref(run_id)
    run_id = ref.run_id
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
        source = run_id
        if ref.fold is not None:
            try:
                tuned = download_artifact(run_id, ref.artifact, Path(tmp) / "tuned", tracking_uri)
            except HistobenchError:
                have = _tuned_folds(run_id, tracking_uri)
                protocol = run["tags"].get("histobench.protocol", "frozen-mil")
                hint = (f"it has {', '.join(have)}" if have else
                        f"its protocol {protocol!r} kept no fine-tuned encoder (--protocol topk-finetune does)")
                raise HistobenchError(f"{what} has no fine-tuned encoder for {ref.suffix[1:]} ({ref.artifact}); "
                                      f"{hint}") from None
            _load_state(module, tuned, f"{what}'s {ref.artifact}", name)
            source = f"{run_id}:{ref.artifact}"
    label = f"{run['name']}:{run_id[:8]}{ref.suffix}"
    return AnalysedEncoder(label=label, module=_ready(module, device), component=component, source=source, run_id=run_id)


def unique_labels(encoders: list[AnalysedEncoder]) -> list[AnalysedEncoder]:
    """Make labels unique in place (``a``, ``a#2``, ...): two files named ``encoder.pt`` stay apart."""
    seen: dict[str, int] = {}
    for e in encoders:
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] > 1:
            e.label = f"{e.label}#{seen[e.label]}"
    return encoders
