"""What a run is made of: the user's :class:`RunSpec` and its :func:`resolve`-d :class:`Components`.

Resolution builds every component from its name, the ``demo`` preset with ``--demo``, then the ``-o`` options,
and checks that every input the pretext and the protocol declare can be produced, before any work is done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histobench.components import REQUIREMENTS, Aggregator, Encoder, Pretext, Protocol, Segmenter, Task, TextEncoder, TrainOptions
from histobench.errors import HistobenchError, OptionError
from histobench.options import validate_model
from histobench.registry import create

NO_PRETEXT = "none"
DEFAULT_PROTOCOL = "frozen-mil"


@dataclass
class RunSpec:
    """Everything a run is made of, as the user gave it (names and ``-o`` options by prefix)."""

    task: str
    pretext: str = NO_PRETEXT
    encoder: str | None = None  # None: the pretext's default encoder (timm for tile pretexts)
    aggregator: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    demo: bool = False
    seed: int = 0
    workdir: Path = Path("histobench-work")
    data_root: Path | None = None
    tracking_uri: str | None = None
    track: bool = True
    device: str | None = None
    fail_fast: bool = False
    allow_leaky_splits: bool = False
    split: str | None = None  # a published split preset of the task; None: the task's `split` option
    protocol: str | None = None  # None: frozen-mil
    segmenter: str | None = None  # None: the pretext's default, when it requires masks
    text_encoder: str | None = None  # None: the pretext's default, when it requires text
    pretrain_task: str | None = None  # pretrain on another task's cohort (labels never read)
    pretrain_manifest: Path | None = None  # ... or on the slides of a manifest (slide_id, case_id, path)
    allow_outside_data_root: bool = False  # slide paths may resolve outside the data root (--allow-outside-data-root)


@dataclass
class Components:
    """The resolved components and policies of a run."""

    task: Task
    encoder: Encoder
    pretext: Pretext | None
    aggregator: Aggregator
    train: TrainOptions | None
    eval: Any  # EvalOptions
    protocol: Protocol | None = None
    segmenter: Segmenter | None = None
    text_encoder: TextEncoder | None = None

    def resolved(self) -> dict[str, Any]:
        out = {
            "task": {"name": self.task.name, **self.task.options.model_dump()},
            "encoder": {"name": self.encoder.name, **self.encoder.options.model_dump()},
            "aggregator": {"name": self.aggregator.name, **self.aggregator.options.model_dump()},
            "eval": self.eval.model_dump(),
        }
        if self.protocol is not None:
            out["protocol"] = {"name": self.protocol.name, **self.protocol.options.model_dump()}
        if self.pretext is not None:
            out["pretext"] = {"name": self.pretext.name, **self.pretext.options.model_dump()}
            out["train"] = self.train.model_dump()
        if self.segmenter is not None:
            out["segmenter"] = {"name": self.segmenter.name, **self.segmenter.options.model_dump()}
        if self.text_encoder is not None:
            out["text_encoder"] = {"name": self.text_encoder.name, **self.text_encoder.options.model_dump()}
        return out


def digest(obj: Any) -> str:
    """A short content hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _split_eval_options(values: dict[str, Any], protocol_cls: type[Protocol]) -> tuple[dict, dict]:
    """``-o eval.*`` goes to the shared evaluation policy or, for the protocol's own fields, to the protocol."""
    from histobench.evaluate.options import EvalOptions

    shared, own = {}, {}
    for key, value in values.items():
        if key in EvalOptions.model_fields:
            shared[key] = value
        elif key in protocol_cls.Options.model_fields:
            own[key] = value
        else:
            from histobench.options import closest_hint

            names = [*EvalOptions.model_fields, *protocol_cls.Options.model_fields]
            raise OptionError(f"option eval.{key}: neither the evaluation policy nor protocol {protocol_cls.name!r} "
                              f"has an option {key!r}.{closest_hint(key, names)} (options: {', '.join(names)})")
    return shared, own


def _component_for(requirement: str, kind: str, name: str | None, flag: str, pretext: Pretext, options: dict | None,
                   preset: str | None):
    if name is None:
        raise HistobenchError(f"pretext {pretext.name!r} requires {requirement} but no {kind.replace('_', ' ')} was named "
                              f"and it has no default; pass {flag} (histobench {kind.replace('_', '-')}s list)")
    return create(kind, name, options, preset)


def resolve(spec: RunSpec) -> Components:
    """Build every component from its name, the ``demo`` preset when ``--demo``, then the ``-o`` options.

    Every input the pretext requires must be producible by a stage of the run: region grids need a ``grid``
    encoder, nuclei ``masks`` a segmenter (``--segmenter`` or the pretext's default), ``text`` a text encoder
    (``--text-encoder`` or the pretext's default); a protocol that reads tiles needs a pixel encoder. Anything
    else is a one-line error here, before any work.
    """
    from histobench.evaluate.options import EvalOptions
    from histobench.evaluate.protocols import INPUT_KINDS
    from histobench.registry import get_component

    preset = "demo" if spec.demo else None
    opts = spec.options
    task = create("task", spec.task, opts.get("task"), preset)
    pretext = None
    train = None
    if spec.pretext != NO_PRETEXT:
        pretext = create("pretext", spec.pretext, opts.get("pretext"), preset)
    encoder_name = spec.encoder or (type(pretext).default_encoder if pretext else "timm")
    encoder = create("encoder", encoder_name, opts.get("encoder"), preset)
    encoder.check()  # a misnamed architecture, cut or file is found now, not after the slides are tiled
    segmenter = text_encoder = None
    if pretext is not None:
        cls = type(pretext)
        unknown = sorted(cls.requires - REQUIREMENTS)
        if unknown:
            raise HistobenchError(f"pretext {cls.name!r} requires {', '.join(unknown)}, which no stage of histobench "
                                  f"produces (known: {', '.join(sorted(REQUIREMENTS))})")
        if ("regions" in cls.requires) != (encoder.input_kind == "grid"):
            raise HistobenchError(
                f"pretext {cls.name!r} needs {'region grids' if 'regions' in cls.requires else 'pixel tiles'} but "
                f"encoder {encoder.name!r} takes {encoder.input_kind}; try --encoder {cls.default_encoder}")
        if "masks" in cls.requires:
            if "regions" in cls.requires:
                raise HistobenchError(f"pretext {cls.name!r} requires both masks and regions; masks exist for pixel tiles only")
            name = spec.segmenter or (cls.demo_segmenter if spec.demo else cls.default_segmenter)
            segmenter = _component_for("nuclei masks", "segmenter", name, "--segmenter", pretext, opts.get("segmenter"), preset)
        if "text" in cls.requires:
            name = spec.text_encoder or (cls.demo_text_encoder if spec.demo else cls.default_text_encoder)
            text_encoder = _component_for("text", "text_encoder", name, "--text-encoder", pretext,
                                          opts.get("text_encoder"), preset)
        train = validate_model(TrainOptions, {**cls.train_defaults, **cls.train_presets.get(preset or "", {}),
                                              **opts.get("train", {})}, "train", "the training loop")
    elif opts.get("train") or opts.get("pretext"):
        raise HistobenchError("pretext./train. options were given but --pretext is none")
    for prefix, used, flag in (("segmenter", segmenter, spec.segmenter), ("text_encoder", text_encoder, spec.text_encoder)):
        if used is None and (opts.get(prefix) or flag):
            what = f"--{prefix.replace('_', '-')} {flag}" if flag else f"{prefix}. options"
            raise HistobenchError(f"{what} given, but pretext {spec.pretext!r} does not use a {prefix.replace('_', ' ')}")
    if opts.get("analysis"):
        raise HistobenchError("analysis. options are for histobench analyze, not for a run")
    aggregator = create("aggregator", spec.aggregator or task.default_aggregator, opts.get("aggregator"), preset)
    protocol_cls = get_component("protocol", spec.protocol or DEFAULT_PROTOCOL).cls
    shared, own = _split_eval_options(opts.get("eval", {}), protocol_cls)
    protocol = create("protocol", protocol_cls.name, own, preset)
    bad = sorted(protocol_cls.inputs - INPUT_KINDS)
    if bad:
        raise HistobenchError(f"protocol {protocol_cls.name!r} asks for {', '.join(bad)}; protocols may ask for "
                              f"{', '.join(sorted(INPUT_KINDS))}")
    if "tiles" in protocol_cls.inputs and encoder.input_kind != "pixels":
        raise HistobenchError(f"protocol {protocol_cls.name!r} trains on pixel tiles but encoder {encoder.name!r} "
                              f"reads {encoder.input_kind}")
    ev = validate_model(EvalOptions, {**type(task).eval_defaults, **type(task).eval_presets.get(preset or "", {}),
                                      **shared}, "eval", "the evaluation protocol")
    if spec.pretrain_task and spec.pretrain_manifest:
        raise HistobenchError("give --pretrain-task or --pretrain-manifest, not both")
    if (spec.pretrain_task or spec.pretrain_manifest) and pretext is None:
        raise HistobenchError("--pretrain-task/--pretrain-manifest need a --pretext to pretrain")
    if spec.pretrain_task:
        get_component("task", spec.pretrain_task)  # an unknown name fails here, with the closest match
    return Components(task, encoder, pretext, aggregator, train, ev, protocol, segmenter, text_encoder)
