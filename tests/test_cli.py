"""The CLI through Typer's test runner."""

import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app

from test_plugins import Throwaway

runner = CliRunner()


def invoke(*args):
    return runner.invoke(build_app(), list(args), env={"COLUMNS": "240"})


@pytest.mark.parametrize(
    "command,name",
    [("encoders", "throwaway-enc"), ("pretexts", "throwaway-pre"), ("aggregators", "throwaway-agg"), ("tasks", "throwaway-task")],
)
def test_list_commands_find_a_throwaway_plugin(register_plugin, command, name):
    register_plugin(Throwaway(), "throwaway")
    result = invoke(command, "list")
    assert result.exit_code == 0, result.output
    assert name in result.output and "throwaway" in result.output


def test_builtins_listed():
    assert "dino" in invoke("pretexts", "list").output
    out = invoke("aggregators", "list").output
    assert "abmil" in out and "mean-linear" in out
    assert "tcga-nsclc" in invoke("tasks", "list").output
    assert "timm" in invoke("encoders", "list").output


def test_show_prints_options_with_defaults_and_descriptions():
    result = invoke("pretexts", "show", "dino")
    assert result.exit_code == 0, result.output
    for text in ("out_dim", "65536", "teacher_temp", "demo preset", "training policy", "batch_size"):
        assert text in result.output
    result = invoke("tasks", "show", "nsclc")  # alias
    assert result.exit_code == 0 and "tcga-nsclc" in result.output and "tile_size" in result.output


def test_plugins_command_lists_versions_and_registrations(register_plugin):
    register_plugin(Throwaway(), "throwaway")
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    assert "histobench==" in result.output
    assert "pretext dino" in result.output
    assert "encoder throwaway-enc" in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["pretexts", "show", "dinoo"], "Did you mean 'dino'"),
        (["run", "--task", "tcga-nsclc", "--pretext", "slpdd", "--demo"], "unknown pretext 'slpdd'"),
        (["run", "--task", "tcga-nsclcc", "--demo"], "Did you mean 'tcga-nsclc'"),
        (["run", "--task", "tcga-nsclc", "--demo", "-o", "pretext.k=8", "--pretext", "dino"], "dino' has no option 'k'"),
        (["run", "--task", "tcga-nsclc", "--demo", "-o", "train.epochs=zero", "--pretext", "dino"], "train.epochs='zero'"),
        (["run", "--task", "tcga-nsclc", "--demo", "-o", "epochs=2"], "must start with one of"),
        (["run", "--task", "tcga-nsclc", "--demo", "-o", "train.epochs=2"], "--pretext is none"),
        (["run", "--task", "tcga-nsclc", "--data-root", "/nonexistent/slides"], "data root /nonexistent/slides is not a folder"),
        (["evaluate", "--task", "tcga-nsclc", "--demo", "--features", "/nonexistent/feats", "--no-track"], "feature folder /nonexistent/feats does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, needle, tmp_path):
    result = runner.invoke(build_app(), [*args, "--workdir", str(tmp_path)] if args[0] in ("run", "evaluate") else args,
                           env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("run", "pretrain", "extract", "evaluate", "leaderboard", "plugins", "pretexts", "tasks"):
        assert cmd in result.output



def test_list_and_plugins_json_include_a_throwaway_plugin(register_plugin):
    import json

    register_plugin(Throwaway(), "throwaway")
    records = json.loads(invoke("encoders", "list", "--format", "json").stdout)
    mine = [r for r in records if r["name"] == "throwaway-enc"]
    assert len(mine) == 1 and mine[0]["plugin"] == "throwaway"
    plugins = {r["plugin"]: r for r in json.loads(invoke("plugins", "--format", "json").stdout)}
    assert {"kind": "encoder", "name": "throwaway-enc"} in plugins["throwaway"]["registers"]
    assert {"kind": "task", "name": "throwaway-task"} in plugins["throwaway"]["registers"]
