"""``histobench plugins`` and ``histobench {encoders,pretexts,aggregators,tasks,...} list|show``.

Each takes ``--format json`` (one JSON document on stdout, for scripts); the tables never break a name
(:func:`histobench.cli.output.print_records`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from histobench.cli.common import console, handle_errors
from histobench.cli.output import NAME, NAMES, TEXT, FormatOpt, OutputFormat, jsonable, print_json, print_records

KIND_COMMANDS = {
    "encoders": "encoder",
    "pretexts": "pretext",
    "aggregators": "aggregator",
    "tasks": "task",
    "segmenters": "segmenter",
    "text-encoders": "text_encoder",
    "protocols": "protocol",
    "analyses": "analysis",
}

OPTION_PREFIX = {kind: kind for kind in KIND_COMMANDS.values()} | {"protocol": "eval"}
"""The ``-o PREFIX.NAME=VALUE`` prefix that sets a kind's options (a protocol's own options share ``eval.``
with the evaluation policy; see ``pipeline.spec._split_eval_options``)."""


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def options_records(cls) -> list[dict]:
    """A component's Options as plain records: name, type, default, value in each preset, description."""
    out = []
    for name, f in cls.Options.model_fields.items():
        out.append({"name": name, "type": _type_name(f.annotation),
                    "default": jsonable(f.get_default(call_default_factory=True)),
                    "presets": {p: jsonable(cls.presets[p][name]) for p in cls.presets if name in cls.presets[p]},
                    "description": f.description or ""})
    return out


def train_policy_records(cls) -> list[dict]:
    """A pretext's training-loop policy (``-o train.*``): each TrainOptions field with the pretext's default and
    the value in each of its training presets."""
    from histobench.components import TrainOptions

    out = []
    for name, f in TrainOptions.model_fields.items():
        out.append({"name": name, "default": jsonable(cls.train_defaults.get(name, f.default)),
                    "presets": {p: jsonable(cls.train_presets[p][name]) for p in cls.train_presets
                                if name in cls.train_presets[p]},
                    "description": f.description or ""})
    return out


def _print_options(records: list[dict], presets, title: str, with_type: bool = True) -> None:
    if not records:
        from rich.text import Text

        console.print(Text(f"{title}: none"))
        return
    columns = [("option", NAME), *((("type", TEXT),) if with_type else ()), ("default", TEXT),
               *((f"{p} preset", TEXT) for p in presets), ("description", TEXT)]
    rows = [[r["name"], *((r["type"],) if with_type else ()), repr(r["default"]),
             *(repr(r["presets"][p]) if p in r["presets"] else "" for p in presets), r["description"]]
            for r in records]
    print_records(console, title, columns, rows)


def text_encoder_facts(cls) -> dict[str, object]:
    """A text encoder's ``dim``, ``shares_image_space`` and ``max_tokens`` under its default options (read
    without loading a model; a value that needs a missing package or file is ``None``, with why under
    ``unknown_because``)."""
    from histobench.errors import HistobenchError

    enc, facts, why = cls(), {}, ""
    for attr in ("dim", "shares_image_space", "max_tokens"):
        try:
            facts[attr] = jsonable(getattr(enc, attr))
        except HistobenchError as e:
            facts[attr] = None
            why = why or str(e)
    if why:
        facts["unknown_because"] = why
    return facts


def _facts_line(facts: dict) -> str:
    why = facts.get("unknown_because")
    text = "  ".join(f"{k}: {'unknown' if v is None else v}" for k, v in facts.items() if k != "unknown_because")
    return text + (f" ({why})" if why else "")


def component_record(kind: str, name: str) -> dict:
    """Everything ``show`` prints about one component, as plain data."""
    import inspect

    from histobench.components import Pretext
    from histobench.registry import get_component

    entry = get_component(kind, name)
    cls = entry.cls
    prefix = OPTION_PREFIX[kind]
    rec = {"name": cls.name, "kind": kind, "aliases": list(cls.aliases), "plugin": entry.plugin,
           "version": entry.version, "summary": cls.summary(), "description": inspect.getdoc(cls) or "",
           "option_prefix": prefix, "presets": list(cls.presets), "options": options_records(cls)}
    if kind == "protocol":
        from histobench.evaluate.options import EvalOptions

        rec["shared_options"] = list(EvalOptions.model_fields)  # the evaluation policy, also -o eval.*
    if kind == "text_encoder":
        rec["facts"] = text_encoder_facts(cls)
    if issubclass(cls, Pretext) and (cls.train_defaults or cls.train_presets):
        rec["train_option_prefix"] = "train"
        rec["train_presets"] = list(cls.train_presets)
        rec["train_policy"] = train_policy_records(cls)
    return rec


def list_records(kind: str) -> list[dict]:
    """Every registered component of ``kind``: name, aliases, plugin, version, summary."""
    from histobench.registry import get_components

    return [{"name": name, "aliases": list(entry.cls.aliases), "plugin": entry.plugin, "version": entry.version,
             "summary": entry.cls.summary()} for name, entry in sorted(get_components(kind).items())]


def make_kind_app(command: str, kind: str) -> typer.Typer:
    app = typer.Typer(help=f"List and describe {command.replace('-', ' ')}.", no_args_is_help=True)

    @app.command("list")
    @handle_errors
    def list_cmd(fmt: FormatOpt = OutputFormat.table) -> None:
        """Every registered name, its plugin and a one-line summary."""
        records = list_records(kind)
        if fmt == OutputFormat.json:
            print_json(records)
            return
        columns = [("name", NAME), ("aliases", NAMES), ("plugin", NAME), ("version", NAME), ("summary", TEXT)]
        print_records(console, command, columns,
                      [[r["name"], r["aliases"], r["plugin"], r["version"], r["summary"]] for r in records])

    @app.command("show")
    @handle_errors
    def show_cmd(name: Annotated[str, typer.Argument(help="Component name or alias.")],
                 fmt: FormatOpt = OutputFormat.table) -> None:
        """The component's description and its options (type, default, presets, description)."""
        from rich.text import Text

        rec = component_record(kind, name)
        if fmt == OutputFormat.json:
            print_json(rec)
            return
        console.print(Text.assemble((rec["name"], "bold"), f" ({kind.replace('_', ' ')}, plugin {rec['plugin']} "
                                    f"{rec['version']})"))
        console.print(Text(rec["description"]))
        if "facts" in rec:
            console.print(Text(_facts_line(rec["facts"])))
        _print_options(rec["options"], rec["presets"], f"{rec['name']} options (-o {rec['option_prefix']}.NAME=VALUE)")
        if "shared_options" in rec:
            console.print(Text(f"The evaluation policy shared by every protocol also takes -o eval.NAME=VALUE: "
                               f"{', '.join(rec['shared_options'])}."))
        if "train_policy" in rec:
            _print_options(rec["train_policy"], rec["train_presets"],
                           f"{rec['name']} training policy (-o train.NAME=VALUE)", with_type=False)

    return app


def plugin_records() -> list[dict]:
    """Loaded plugins: name, distribution and version, hooks, and what each registers (kind and name)."""
    from histobench.plugins import plugin_hooks, plugin_versions
    from histobench.registry import get_components

    registered: dict[str, list[dict]] = {}
    for kind in KIND_COMMANDS.values():
        for name, entry in get_components(kind).items():
            registered.setdefault(entry.plugin, []).append({"kind": kind, "name": name})
    hooks = plugin_hooks()
    return [{"plugin": name, "distribution": version, "hooks": list(hooks.get(name, [])),
             "registers": registered.get(name, [])} for name, version in sorted(plugin_versions().items())]


def plugins_cmd(fmt: FormatOpt = OutputFormat.table) -> None:
    """Loaded plugins: name, distribution and version, hooks, and the components each registers."""
    records = plugin_records()
    if fmt == OutputFormat.json:
        print_json(records)
        return
    columns = [("plugin", NAME), ("distribution", NAME), ("hooks", NAMES), ("registers", NAMES)]
    rows = [[r["plugin"], r["distribution"], r["hooks"],
             [f"{x['kind'].replace('_', ' ')} {x['name']}" for x in r["registers"]]] for r in records]
    print_records(console, "plugins", columns, rows)
