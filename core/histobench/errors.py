"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class HistobenchError(Exception):
    """A mistake in user input (a name, an option, a file) with a one-line explanation."""


class UnknownComponentError(HistobenchError):
    """A component name that no loaded plugin registers."""


class DuplicateComponentError(HistobenchError):
    """Two plugins registered the same component name."""


class OptionError(HistobenchError):
    """An ``-o key=value`` option that does not fit the component's Options model."""
