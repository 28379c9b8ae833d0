import os

import tomllib
from pathlib import Path

# Hermetic runs: every plugin that histobench's own distribution names in its entry-point group (so a new
# built-in plugin is loaded, and contract-checked, without anyone editing a list), nothing else installed on the
# machine; no network; MLflow never in the working directory.
_PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
BUILTIN_PLUGINS = sorted(_PYPROJECT["project"]["entry-points"]["histobench"])
os.environ.setdefault("HISTOBENCH_LOAD_PLUGINS", ",".join(BUILTIN_PLUGINS))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

import tempfile  # noqa: E402

import pytest  # noqa: E402

# No test may write MLflow's default store into the working directory.
_TRACKING_DIR = tempfile.mkdtemp(prefix="histobench-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TRACKING_DIR}/mlflow.db"


@pytest.fixture
def register_plugin():
    """Register a throwaway plugin object for one test: ``register_plugin(obj, name)``."""
    from histobench.plugins import load_plugins

    pm = load_plugins()
    names = []

    def register(plugin, name):
        pm.register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        pm.unregister(name=name)


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh SQLite MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core CPU: one intra-op thread is several times faster than contended ones.

    Modules that train many tiny models use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
