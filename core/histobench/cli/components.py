"""``histobench plugins`` and ``histobench {encoders,pretexts,aggregators,tasks,...} list|show``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from histobench.cli.common import console, handle_errors

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


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def options_table(cls, title: str) -> Table:
    """A rich table of a component's Options: name, type, default, presets, description."""
    table = Table(title=title, title_justify="left")
    for col in ("option", "type", "default", *(f"{p} preset" for p in cls.presets), "description"):
        table.add_column(col, overflow="fold")
    for name, f in cls.Options.model_fields.items():
        default = f.get_default(call_default_factory=True)
        row = [name, _type_name(f.annotation), repr(default)]
        row += [repr(cls.presets[p][name]) if name in cls.presets[p] else "" for p in cls.presets]
        table.add_row(*row, f.description or "")
    return table


def text_encoder_facts(cls) -> str:
    """A text encoder's ``dim``, ``shares_image_space`` and ``max_tokens`` under its default options (read
    without loading a model; a value that needs a missing package or file is shown as unknown, with why)."""
    from histobench.errors import HistobenchError

    enc, facts, why = cls(), [], ""
    for attr in ("dim", "shares_image_space", "max_tokens"):
        try:
            facts.append(f"{attr}: {getattr(enc, attr)}")
        except HistobenchError as e:
            facts.append(f"{attr}: unknown")
            why = why or f" ({e})"
    return "  ".join(facts) + why


def make_kind_app(command: str, kind: str) -> typer.Typer:
    app = typer.Typer(help=f"List and describe {command.replace('-', ' ')}.", no_args_is_help=True)

    @app.command("list")
    @handle_errors
    def list_cmd() -> None:
        """Every registered name, its plugin and a one-line summary."""
        from histobench.registry import get_components

        table = Table(title=command)
        for col in ("name", "aliases", "plugin", "version", "summary"):
            table.add_column(col, overflow="fold")
        for name, entry in sorted(get_components(kind).items()):
            table.add_row(name, ", ".join(entry.cls.aliases), entry.plugin, entry.version, entry.cls.summary())
        console.print(table)

    @app.command("show")
    @handle_errors
    def show_cmd(name: Annotated[str, typer.Argument(help="Component name or alias.")]) -> None:
        """The component's description and its options (type, default, presets, description)."""
        import inspect

        from histobench.components import Pretext, TrainOptions
        from histobench.registry import get_component

        entry = get_component(kind, name)
        cls = entry.cls
        console.print(f"[bold]{cls.name}[/] ({kind.replace('_', ' ')}, plugin {entry.plugin} {entry.version})")
        console.print(inspect.getdoc(cls) or "", highlight=False)
        if kind == "text_encoder":
            console.print(text_encoder_facts(cls), highlight=False)
        console.print(options_table(cls, f"{cls.name} options (-o {kind}.NAME=VALUE)"))
        if issubclass(cls, Pretext) and (cls.train_defaults or cls.train_presets):
            table = Table(title=f"{cls.name} training policy (-o train.NAME=VALUE)", title_justify="left")
            for col in ("option", "default", *(f"{p} preset" for p in cls.train_presets), "description"):
                table.add_column(col, overflow="fold")
            for fname, f in TrainOptions.model_fields.items():
                default = cls.train_defaults.get(fname, f.default)
                row = [fname, repr(default)] + [repr(cls.train_presets[p].get(fname, "")) if fname in cls.train_presets[p] else "" for p in cls.train_presets]
                table.add_row(*row, f.description or "")
            console.print(table)

    return app


def plugins_cmd() -> None:
    """Loaded plugins: name, distribution and version, hooks, and the components each registers."""
    from histobench.plugins import plugin_hooks, plugin_versions
    from histobench.registry import get_components

    registered: dict[str, list[str]] = {}
    for kind in KIND_COMMANDS.values():
        for name, entry in get_components(kind).items():
            registered.setdefault(entry.plugin, []).append(f"{kind.replace('_', ' ')} {name}")
    table = Table(title="plugins")
    for col in ("plugin", "distribution", "hooks", "registers"):
        table.add_column(col, overflow="fold")
    hooks = plugin_hooks()
    for name, version in sorted(plugin_versions().items()):
        table.add_row(name, version, ", ".join(hooks.get(name, [])), ", ".join(registered.get(name, [])))
    console.print(table)
