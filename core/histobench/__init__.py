"""histobench: benchmark self-supervised pretext tasks for computational pathology.

The public API is small: the ``hookimpl`` marker for plugin authors, and the registry getters
(``get_components``, ``create``) that build components by name.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("histobench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("histobench")

from histobench.registry import create, get_component, get_components  # noqa: E402

__all__ = ["__version__", "hookimpl", "get_components", "get_component", "create"]
