"""Component registries built from the plugins' ``register_*`` hooks.

Each kind's registry is built by calling every plugin's hook implementation in turn with a ``register``
closure, so each entry records the plugin (and its distribution version) that registered it. A duplicate
name raises, naming both plugins.

A plugin's own bugs are named too: an exception (other than a :class:`HistobenchError`) raised while a
component is built (its constructor in :func:`create`, its ``build`` or ``setup`` method wherever the pipeline
calls them) becomes one :class:`ComponentBuildError` line naming the kind, the component and its plugin; the
original exception stays chained for debugging.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from histobench.components import BASES, HOOKS, Component
from histobench.errors import DuplicateComponentError, HistobenchError, UnknownComponentError
from histobench.plugins import load_plugins, plugin_versions

BUILD_METHODS = ("build", "setup", "check")  # the methods that turn a component's options into working parts


class ComponentBuildError(HistobenchError):
    """A plugin's component raised while it was constructed or built."""


def _failure(kind: str, cls: type, plugin: str, what: str, err: BaseException) -> ComponentBuildError:
    text = " ".join(str(err).split())
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return ComponentBuildError(f"{kind.replace('_', ' ')} {cls.name!r} of plugin {plugin!r} failed to {what}: {detail}")


_PLUGIN_OF: dict[type, str] = {}  # component class -> the plugin that registered it


def _guard(kind: str, cls: type, plugin: str) -> None:
    """Wrap ``cls``'s own build/setup methods (once) so that a plugin's exception names the plugin."""
    import functools

    _PLUGIN_OF[cls] = plugin
    for method in BUILD_METHODS:
        fn = cls.__dict__.get(method)
        if fn is None or not callable(fn) or getattr(fn, "_histobench_guarded", False):
            continue

        def guarded(self, *args, _fn=fn, _method=method, **kwargs):
            try:
                return _fn(self, *args, **kwargs)
            except HistobenchError:
                raise
            except Exception as err:
                raise _failure(kind, type(self), _PLUGIN_OF.get(type(self), plugin), _method, err) from err

        functools.update_wrapper(guarded, fn)
        guarded._histobench_guarded = True  # type: ignore[attr-defined]
        setattr(cls, method, guarded)


@dataclass(frozen=True)
class Entry:
    """A registered component class and where it came from."""

    cls: type[Component]
    plugin: str
    version: str

    @property
    def name(self) -> str:
        return self.cls.name


def get_components(kind: str) -> dict[str, Entry]:
    """All registered components of one kind (``encoder``, ``pretext``, ...), by name (aliases excluded)."""
    if kind not in HOOKS:
        raise HistobenchError(f"unknown component kind {kind!r}; kinds: {', '.join(HOOKS)}")
    pm = load_plugins()
    versions = plugin_versions()
    base = BASES[kind]
    found: dict[str, Entry] = {}
    taken: dict[str, str] = {}  # name or alias -> canonical name

    for impl in reversed(getattr(pm.hook, HOOKS[kind]).get_hookimpls()):  # registration order
        plugin = impl.plugin_name

        def register(cls: type, _plugin: str = plugin) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise HistobenchError(
                    f"plugin {_plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of {base.__name__}"
                )
            if not cls.name:
                raise HistobenchError(f"plugin {_plugin!r} registered {cls.__name__} without a name")
            for key in (cls.name, *cls.aliases):
                if key in taken:
                    other = found[taken[key]].plugin
                    raise DuplicateComponentError(
                        f"{kind} name {key!r} is registered by both plugin {other!r} and plugin {_plugin!r}"
                    )
            _guard(kind, cls, _plugin)
            found[cls.name] = Entry(cls, _plugin, versions.get(_plugin, "local"))
            for key in (cls.name, *cls.aliases):
                taken[key] = cls.name

        kwargs = {"register": register}
        impl.function(*[kwargs[a] for a in impl.argnames])
    return found


def _resolve(kind: str, name: str) -> Entry:
    entries = get_components(kind)
    if name in entries:
        return entries[name]
    for entry in entries.values():
        if name in entry.cls.aliases:
            return entry
    names = sorted(entries)
    close = difflib.get_close_matches(name, names + [a for e in entries.values() for a in e.cls.aliases], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownComponentError(
        f"unknown {kind.replace('_', ' ')} {name!r}.{hint} Available: {', '.join(names) or '(none)'}"
    )


def get_component(kind: str, name: str) -> Entry:
    """The registry entry for ``name`` (or an alias); an unknown name raises with the closest match."""
    return _resolve(kind, name)


def create(kind: str, name: str, options: dict[str, Any] | None = None, preset: str | None = None) -> Component:
    """Instantiate a component: the class's defaults, then ``preset``'s values, then ``options``."""
    from histobench.options import validate_options

    entry = _resolve(kind, name)
    merged = {**entry.cls.preset(preset), **(options or {})}
    options_model = validate_options(entry.cls, merged, prefix=kind)
    try:
        return entry.cls(options_model)
    except HistobenchError:
        raise
    except Exception as err:
        raise _failure(kind, entry.cls, entry.plugin, "build", err) from err
