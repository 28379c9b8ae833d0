"""``-o key=value`` options: parsing and validation against a component's ``Options`` model."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from histobench.errors import OptionError

PREFIXES = ("encoder", "pretext", "aggregator", "task", "train", "eval", "segmenter", "text_encoder", "analysis")


def parse_value(raw: str) -> Any:
    """Parse a value as YAML would (``3`` -> int, ``true`` -> bool, ``[1, 2]`` -> list), and ``1e-4`` as a float."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_options(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """Group ``["pretext.k=8", "train.epochs=2"]`` into ``{"pretext": {"k": 8}, "train": {"epochs": 2}}``."""
    grouped: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise OptionError(f"option {pair!r} is not of the form prefix.key=value (e.g. pretext.out_dim=4096)")
        key, raw = pair.split("=", 1)
        prefix, _, field = key.strip().partition(".")
        if prefix not in PREFIXES or not field:
            hint = closest_hint(prefix, PREFIXES, suffix=f".{field}") if field else ""
            raise OptionError(
                f"option {key!r} must start with one of {', '.join(p + '.' for p in PREFIXES)}"
                f" (e.g. pretext.out_dim=4096).{hint}"
            )
        grouped.setdefault(prefix, {})[field] = parse_value(raw)
    return grouped


def _first_error(err: ValidationError, model: type[BaseModel], prefix: str, owner: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"option {prefix}.{loc}: {owner} has no option {loc!r}.{closest_hint(loc, model.model_fields)} (its options: {known})"
    value = e.get("input")
    return f"option {prefix}.{loc}={value!r}: {e['msg']}"


def closest_hint(name: str, candidates, suffix: str = "") -> str:
    """`` Did you mean 'x'?`` for the closest of ``candidates`` (difflib's ratio >= 0.6), else ``""``;
    ``suffix`` is appended to the suggestion (the key after a misspelt prefix)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return f" Did you mean {close[0] + suffix!r}?" if close else ""


def validate_model(model: type[BaseModel], values: dict[str, Any], prefix: str, owner: str) -> BaseModel:
    """Instantiate ``model`` from ``values``; any problem is one :class:`OptionError` line."""
    try:
        return model(**values)
    except ValidationError as err:
        raise OptionError(_first_error(err, model, prefix, owner)) from None


def validate_options(cls: type, values: dict[str, Any], prefix: str) -> BaseModel:
    """Validate ``values`` against the component class's ``Options``."""
    return validate_model(cls.Options, values, prefix, f"{prefix} {cls.name!r}")
