"""The plugin manager. Built once at import; plugins are loaded lazily by :func:`load_plugins`.

Every plugin, the built-in ones too, is found through the ``histobench`` entry-point group.

Environment variables:

``HISTOBENCH_DISABLE_PLUGINS``
    Comma-separated entry-point names that are never loaded (``set_blocked``).
``HISTOBENCH_LOAD_PLUGINS``
    If set, only these entry-point names are loaded, plus ``core`` (histobench's own protocols, segmenters,
    text encoders and analyses), which is always loaded unless disabled; an empty value loads only ``core``.
``HISTOBENCH_TRACE_PLUGINS``
    If set, every hook call is printed with its implementations and results.
"""

from __future__ import annotations

import os
import sys

import pluggy

from histobench import hookspecs
from histobench.errors import HistobenchError

GROUP = "histobench"
CORE = "core"  # the entry point of histobench.builtin

pm = pluggy.PluginManager(GROUP)
pm.add_hookspecs(hookspecs)

_loaded = False


def _names(var: str) -> list[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def load_plugins() -> pluggy.PluginManager:
    """Load the entry-point plugins once; later calls return the same manager."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in _names("HISTOBENCH_DISABLE_PLUGINS") or []:
        pm.set_blocked(name)
    allow = _names("HISTOBENCH_LOAD_PLUGINS")
    try:
        if allow is None:
            pm.load_setuptools_entrypoints(GROUP)
        else:
            for name in dict.fromkeys([CORE, *allow]):
                pm.load_setuptools_entrypoints(GROUP, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise HistobenchError(f"plugin {err.plugin!r} is invalid: {err}") from None
    except Exception as err:  # an entry point whose module raises anything on import
        raise HistobenchError(f"{_failed_entry_point(allow)} failed to import: {_one_line(err)}") from err
    if os.environ.get("HISTOBENCH_TRACE_PLUGINS"):
        def before(hook_name, impls, kwargs):
            print(f"hook {hook_name}: {[i.plugin_name for i in impls]}", file=sys.stderr)

        def after(outcome, hook_name, impls, kwargs):
            pass

        pm.add_hookcall_monitoring(before, after)
    return pm


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _failed_entry_point(allow: list[str] | None) -> str:
    """Name the entry point that was loading when an import failed.

    pluggy loads the group's entry points in distribution order and registers each as soon as it is imported,
    so the culprit is the first one (in that order, within ``allow``) that is neither registered nor blocked.
    """
    import importlib.metadata

    found = [(dist, ep) for dist in importlib.metadata.distributions() for ep in dist.entry_points if ep.group == GROUP]
    if allow is not None:  # loaded one name at a time, in this order
        found = [(d, ep) for name in dict.fromkeys([CORE, *allow]) for d, ep in found if ep.name == name]
    for dist, ep in found:
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        project = dist.metadata["name"] if dist.metadata else "?"
        return f"plugin {ep.name!r} ({ep.value}, from {project} {dist.version})"
    return "a histobench plugin"


def plugin_versions() -> dict[str, str]:
    """Map every registered plugin name to ``distribution==version`` (or ``local``)."""
    load_plugins()
    dists = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = {}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist = dists.get(name)
        out[name] = f"{dist.project_name}=={dist.version}" if dist is not None else "local"
    return out


def plugin_hooks() -> dict[str, list[str]]:
    """Map every registered plugin name to the hooks it implements."""
    load_plugins()
    return {pm.get_name(p): sorted(h.name for h in pm.get_hookcallers(p) or []) for p in pm.get_plugins()}
