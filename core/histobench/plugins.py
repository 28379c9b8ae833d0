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
    except ImportError as err:
        raise HistobenchError(f"a histobench plugin failed to import: {err}") from None
    if os.environ.get("HISTOBENCH_TRACE_PLUGINS"):
        def before(hook_name, impls, kwargs):
            print(f"hook {hook_name}: {[i.plugin_name for i in impls]}", file=sys.stderr)

        def after(outcome, hook_name, impls, kwargs):
            pass

        pm.add_hookcall_monitoring(before, after)
    return pm


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
