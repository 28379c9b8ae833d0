"""The plugin system: registration, duplicates, unknown names, options, blocking, entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from histobench import hookimpl
from histobench.components import Aggregator, Encoder, Pretext, Task
from histobench.errors import DuplicateComponentError, HistobenchError, OptionError, UnknownComponentError
from histobench.options import parse_options, parse_value
from histobench.registry import create, get_component, get_components

REPO = Path(__file__).resolve().parents[1]


class ThrowawayEncoder(Encoder):
    """A throwaway encoder."""

    name = "throwaway-enc"
    aliases = ("tw-enc",)

    class Options(Encoder.Options):
        width: int = Field(4, ge=1, description="Output width.")


class ThrowawayPretext(Pretext):
    """A throwaway pretext."""

    name = "throwaway-pre"


class ThrowawayAggregator(Aggregator):
    """A throwaway aggregator."""

    name = "throwaway-agg"


class ThrowawayTask(Task):
    """A throwaway task."""

    name = "throwaway-task"
    classes = ("a", "b")
    metrics = ("macro_auc",)
    primary_metric = "macro_auc"


class Throwaway:
    @hookimpl
    def register_encoders(self, register):
        register(ThrowawayEncoder)

    @hookimpl
    def register_pretexts(self, register):
        register(ThrowawayPretext)

    @hookimpl
    def register_aggregators(self, register):
        register(ThrowawayAggregator)

    @hookimpl
    def register_tasks(self, register):
        register(ThrowawayTask)


def test_builtins_are_loaded_through_entry_points():
    from histobench.plugins import load_plugins, plugin_versions

    pm = load_plugins()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"timm", "dino", "mil", "tcga"} <= names
    versions = plugin_versions()
    assert versions["dino"].startswith("histobench==")
    assert get_component("pretext", "dino").plugin == "dino"
    assert get_component("task", "tcga-nsclc").plugin == "tcga"
    assert set(get_components("aggregator")) >= {"abmil", "mean-linear"}


def test_throwaway_plugin_registers_every_kind(register_plugin):
    register_plugin(Throwaway(), "throwaway")
    assert get_components("encoder")["throwaway-enc"].plugin == "throwaway"
    assert get_components("encoder")["throwaway-enc"].version == "local"
    assert "throwaway-pre" in get_components("pretext")
    assert "throwaway-agg" in get_components("aggregator")
    assert "throwaway-task" in get_components("task")
    assert get_component("encoder", "tw-enc").cls is ThrowawayEncoder  # alias
    enc = create("encoder", "throwaway-enc", {"width": 7})
    assert enc.options.width == 7


def test_unregistered_plugin_is_gone(register_plugin):
    register_plugin(Throwaway(), "throwaway")
    from histobench.plugins import load_plugins

    load_plugins().unregister(name="throwaway")
    assert "throwaway-enc" not in get_components("encoder")
    load_plugins().register(Throwaway(), name="throwaway")  # the fixture unregisters it again


def test_duplicate_name_names_both_plugins(register_plugin):
    class Dup(Aggregator):
        """Clashes with the built-in abmil."""

        name = "abmil"

    class DupPlugin:
        @hookimpl
        def register_aggregators(self, register):
            register(Dup)

    register_plugin(DupPlugin(), "clasher")
    with pytest.raises(DuplicateComponentError) as err:
        get_components("aggregator")
    assert "'mil'" in str(err.value) and "'clasher'" in str(err.value) and "'abmil'" in str(err.value)


def test_duplicate_alias_is_an_error(register_plugin):
    class AliasClash(Encoder):
        """Its alias is another encoder's name."""

        name = "another-enc"
        aliases = ("timm",)

    class P:
        @hookimpl
        def register_encoders(self, register):
            register(AliasClash)

    register_plugin(P(), "alias-clasher")
    with pytest.raises(DuplicateComponentError, match="'timm'"):
        get_components("encoder")


def test_registering_a_non_component_is_an_error(register_plugin):
    class Bad:
        @hookimpl
        def register_pretexts(self, register):
            register(object)

    register_plugin(Bad(), "bad")
    with pytest.raises(HistobenchError, match="'bad'.*not a subclass of Pretext"):
        get_components("pretext")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownComponentError) as err:
        get_component("pretext", "dinoo")
    msg = str(err.value)
    assert "'dinoo'" in msg and "Did you mean 'dino'" in msg and "Available:" in msg


def test_misspelled_hook_fails_check_pending():
    import pluggy

    from histobench.plugins import pm

    class Misspelled:
        @hookimpl
        def register_pretext(self, register):  # missing "s"
            pass

    pm.register(Misspelled(), name="misspelled")
    try:
        with pytest.raises(pluggy.PluginValidationError):
            pm.check_pending()
    finally:
        pm.unregister(name="misspelled")


@pytest.mark.parametrize(
    "raw,value",
    [("3", 3), ("1e-4", 1e-4), ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("vit_small", "vit_small"), ("null", None)],
)
def test_parse_value(raw, value):
    assert parse_value(raw) == value


def test_parse_options_groups_by_prefix():
    assert parse_options(["pretext.out_dim=1024", "train.epochs=2", "pretext.n_local_crops=4"]) == {
        "pretext": {"out_dim": 1024, "n_local_crops": 4},
        "train": {"epochs": 2},
    }
    with pytest.raises(OptionError, match="prefix.key=value"):
        parse_options(["pretext.out_dim"])
    with pytest.raises(OptionError, match="must start with one of"):
        parse_options(["model.depth=3"])


def test_option_validation_is_one_line():
    with pytest.raises(OptionError) as err:
        create("pretext", "dino", {"out_dimm": 3})
    msg = str(err.value)
    assert "pretext.out_dimm" in msg and "'dino'" in msg and "out_dim" in msg and "\n" not in msg
    with pytest.raises(OptionError) as err:
        create("pretext", "dino", {"out_dim": "many"})
    assert "pretext.out_dim='many'" in str(err.value)
    assert create("pretext", "dino", {"out_dim": 128}).options.out_dim == 128


def test_preset_then_options():
    dino = create("pretext", "dino", {"n_local_crops": 2}, preset="demo")
    assert dino.options.n_local_crops == 2
    assert dino.options.out_dim == type(dino).presets["demo"]["out_dim"]
    assert create("pretext", "dino").options.out_dim == 65536  # the paper's default


def test_disable_and_allow_list_env_vars():
    code = "from histobench.registry import get_components; print(sorted(get_components('aggregator')))"
    env = {**os.environ, "HISTOBENCH_DISABLE_PLUGINS": "mil"}
    env.pop("HISTOBENCH_LOAD_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "abmil" not in out.stdout
    env = {**os.environ, "HISTOBENCH_LOAD_PLUGINS": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plugin_modules_do_not_import_torch():
    code = (
        "import sys; from histobench.registry import get_components;"
        "from histobench.components import HOOKS;"
        "[get_components(k) for k in HOOKS];"
        "print('torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_example_plugin_package_installs_and_is_found(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(REPO / "tests" / "example_plugin")],
        check=True, capture_output=True, text=True,
    )
    assert (target / "histobench_example").is_dir()
    env = {k: v for k, v in os.environ.items() if k != "HISTOBENCH_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(target)
    env["COLUMNS"] = "300"
    out = subprocess.run([sys.executable, "-m", "histobench", "aggregators", "list"], env=env,
                         capture_output=True, text=True, check=True)
    assert "max-pool" in out.stdout and "example" in out.stdout
    out = subprocess.run([sys.executable, "-m", "histobench", "plugins"], env=env, capture_output=True, text=True, check=True)
    assert "histobench-example==0.3.0" in out.stdout
    out = subprocess.run([sys.executable, "-m", "histobench", "example-hello"], env=env, capture_output=True, text=True, check=True)
    assert "hello from histobench-example" in out.stdout
    code = "from histobench.testing import check_aggregator; check_aggregator('max-pool'); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
