"""HistoTransfer's study as one command sequence: encoders x truncation points x frozen vs top-k, one leaderboard.

Sharma et al., IEEE BHI 2021, arXiv:2106.07068 (spec ``histotransfer.md`` §1, §2.2): ImageNet ResNet18/34/50
and DenseNet121 (timm's ``tv_in1k`` tags, the torchvision weights of the paper's code, spec §3) against
histopathology encoders (KimiaNet from a user-supplied file, the ``histology`` hub models the user has access
to), each cut at every block of the §2.2 table, each under the paper's attention-pooling head
(``--aggregator attention-pool``), with frozen features (``frozen-mil``) and, once that protocol is
registered, top-k fine-tuning (``topk-finetune``). Every row is an ordinary ``histobench run``, so every stage is
cached and logged, and ``histobench leaderboard`` ranks them all, per protocol.

``histobench histotransfer-study`` prints the commands; ``--run`` runs them in order (stopping at the first
failure) and then the leaderboard. With ``--demo`` the rows are CPU-sized: random-init ResNet18 at two cuts and a
random-init KimiaNet-shaped DenseNet121 cut at ``denseblock3``, top-k only on the first row.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

RESNET18_CUTS = ("layer1", "layer2", "layer3", "layer4")
DENSENET_CUTS = ("denseblock1", "transition1", "denseblock2", "transition2", "denseblock3", "transition3",
                 "denseblock4", "norm5")
TOPK = "topk-finetune"
AGGREGATOR = "attention-pool"


def available_protocols() -> list[str]:
    """``frozen-mil``, and ``topk-finetune`` when a plugin registers it (``histobench protocols list``)."""
    from histobench.registry import get_components

    return ["frozen-mil"] + ([TOPK] if TOPK in get_components("protocol") else [])


def study_rows(demo: bool = False, kimianet_weights: str | None = None,
               histology: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """``(label, encoder arguments)`` per encoder row of the study."""
    if demo:  # random init, CPU-sized; the demo preset's ViT kwargs cleared for the CNN
        cnn = ["-o", "encoder.pretrained=false", "-o", "encoder.model_kwargs={}"]
        return [(f"resnet18@{cut}", ["-o", "encoder.arch=resnet18", "-o", f"encoder.truncate_at={cut}", *cnn])
                for cut in ("layer2", "layer4")] + [
            ("kimianet-random@denseblock3", ["--encoder", "kimianet", "-o", "encoder.truncate_at=denseblock3"])]
    rows = [(f"resnet18@{cut}", ["-o", "encoder.arch=resnet18.tv_in1k", "-o", "encoder.pretrained=true",
                                 "-o", f"encoder.truncate_at={cut}"]) for cut in RESNET18_CUTS]
    rows += [(f"{arch}@layer4", ["-o", f"encoder.arch={arch}.tv_in1k", "-o", "encoder.pretrained=true",
                                 "-o", "encoder.truncate_at=layer4"]) for arch in ("resnet34", "resnet50")]
    rows += [(f"densenet121@{cut}", ["-o", "encoder.arch=densenet121.tv_in1k", "-o", "encoder.pretrained=true",
                                     "-o", f"encoder.truncate_at={cut}"]) for cut in DENSENET_CUTS]
    if kimianet_weights:
        rows += [(f"kimianet@{cut}", ["--encoder", "kimianet", "-o", f"encoder.weights={kimianet_weights}",
                                      "-o", f"encoder.truncate_at={cut}"]) for cut in DENSENET_CUTS]
    rows += [(name, ["--encoder", "histology", "-o", f"encoder.model={name}"]) for name in histology]
    return rows


def study_commands(task: str = "tcga-nsclc", demo: bool = False, kimianet_weights: str | None = None,
                   histology: tuple[str, ...] = (), protocols: list[str] | None = None,
                   common: list[str] | None = None) -> list[list[str]]:
    """Every ``histobench run`` of the study, then its ``histobench leaderboard`` (argument lists, no program name).

    ``common`` is added to every command (``--workdir``, ``--tracking-uri``, ``--data-root``, ``-o`` options).
    """
    protocols = protocols if protocols is not None else available_protocols()
    common = list(common or [])
    head = ["run", "--pretext", "none", "--task", task, "--aggregator", AGGREGATOR, *(["--demo"] if demo else [])]
    commands = []
    rows = study_rows(demo, kimianet_weights, histology)
    for protocol in protocols:
        for i, (_, args) in enumerate(rows):
            if protocol == "frozen-mil":
                commands.append([*head, *args, *common])
            elif not demo or i == 0:  # top-k fine-tuning is the slow part: on the CPU, the first row only
                commands.append([*head, "--protocol", protocol, *args, *common])
    board = ["leaderboard", "--task", task, "--format", "table", "--format", "md", "--format", "csv"]
    for i, arg in enumerate(common[:-1]):
        if arg == "--tracking-uri":
            board += [arg, common[i + 1]]
    return commands + [board]


def study_cmd(
    task: Annotated[str, typer.Option("--task", help="The task every row runs on.")] = "tcga-nsclc",
    demo: Annotated[bool, typer.Option("--demo", help="CPU-sized rows: random-init encoders, two ResNet18 cuts, one DenseNet cut.")] = False,
    run: Annotated[bool, typer.Option("--run", help="Run the commands (default: print them).")] = False,
    kimianet_weights: Annotated[Optional[Path], typer.Option("--kimianet-weights", help="KimiaNetPyTorchWeights.pth: adds KimiaNet rows.")] = None,
    histology: Annotated[Optional[list[str]], typer.Option("--histology", help="A hub model of the histology encoder (repeatable).")] = None,
    protocol: Annotated[Optional[list[str]], typer.Option("--protocol", help="Protocols (repeatable; default: frozen-mil, and topk-finetune when registered).")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Passed to every run.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="Passed to every run and the leaderboard.")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Passed to every run.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("-o", "--option", help="prefix.key=value for every run.")] = None,
) -> None:
    """HistoTransfer's study: ImageNet vs histopathology encoders x truncation points x frozen vs top-k."""
    from histobench.errors import HistobenchError

    common: list[str] = []
    for flag, value in (("--workdir", workdir), ("--tracking-uri", tracking_uri), ("--data-root", data_root)):
        if value is not None:
            common += [flag, str(value)]
    for pair in option or []:
        common += ["-o", pair]
    known = available_protocols()
    unknown = [p for p in protocol or [] if p not in known]
    if unknown:
        raise HistobenchError(f"protocol {unknown[0]!r} is not registered (available: {', '.join(known)})")
    commands = study_commands(task, demo, str(kimianet_weights) if kimianet_weights else None, tuple(histology or ()),
                              list(protocol) if protocol else None, common)
    for i, args in enumerate(commands, 1):
        print(f"histobench {shlex.join(args)}")
        if run:
            code = subprocess.call([sys.executable, "-m", "histobench", *args])
            if code != 0:
                raise HistobenchError(f"study step {i}/{len(commands)} failed (exit code {code}): histobench {shlex.join(args)}")


def register_study_command(app: typer.Typer) -> None:
    from histobench.cli.common import handle_errors

    app.command("histotransfer-study", rich_help_panel="Plugins")(handle_errors(study_cmd))
