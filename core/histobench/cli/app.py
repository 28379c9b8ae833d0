"""The ``histobench`` command: a Typer app built by :func:`build_app`, extended by plugins."""

from __future__ import annotations

import typer

from histobench.cli.analyze import analyze_cmd
from histobench.cli.common import handle_errors
from histobench.cli.components import KIND_COMMANDS, make_kind_app, plugins_cmd
from histobench.cli.compare import compare_cmd
from histobench.cli.leaderboard import leaderboard_cmd
from histobench.cli.run import evaluate_cmd, extract_cmd, pretrain_cmd, run_cmd


def build_app() -> typer.Typer:
    """A fresh app with the core commands, then every plugin's ``register_commands``."""
    from histobench.plugins import load_plugins

    app = typer.Typer(
        name="histobench",
        help="Benchmark self-supervised pretext tasks for computational pathology.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,
    )
    app.command("run", rich_help_panel="Pipeline")(handle_errors(run_cmd))
    app.command("pretrain", rich_help_panel="Pipeline")(handle_errors(pretrain_cmd))
    app.command("extract", rich_help_panel="Pipeline")(handle_errors(extract_cmd))
    app.command("evaluate", rich_help_panel="Pipeline")(handle_errors(evaluate_cmd))
    from histobench.cli.segment import segment_cmd

    app.command("segment", rich_help_panel="Pipeline")(handle_errors(segment_cmd))
    app.command("leaderboard", rich_help_panel="Results")(handle_errors(leaderboard_cmd))
    app.command("compare", rich_help_panel="Results")(handle_errors(compare_cmd))
    app.command("analyze", rich_help_panel="Results")(handle_errors(analyze_cmd))
    app.command("plugins", rich_help_panel="Plugins")(handle_errors(plugins_cmd))
    from histobench.cli import cohort, slides, splits

    app.add_typer(slides.app, name="slides", rich_help_panel="Data")
    app.add_typer(cohort.app, name="cohort", rich_help_panel="Data")
    app.add_typer(splits.app, name="splits", rich_help_panel="Data")
    for command, kind in KIND_COMMANDS.items():
        app.add_typer(make_kind_app(command, kind), name=command, rich_help_panel="Plugins")
    pm = load_plugins()
    pm.hook.register_commands(app=app)
    return app


def main() -> None:
    import typer.rich_utils
    from rich.markup import escape

    from histobench.cli.common import err_console
    from histobench.errors import HistobenchError
    from histobench.reporting import no_color

    if no_color():  # Typer's help and usage errors: no style escapes either (its consoles read this global)
        typer.rich_utils.COLOR_SYSTEM = None

    try:
        app = build_app()
    except HistobenchError as err:  # a broken plugin: say which, and how to start without it
        err_console.print(f"[bold red]error:[/] {escape(str(err))} (HISTOBENCH_DISABLE_PLUGINS=name skips a plugin)",
                          highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    app()
