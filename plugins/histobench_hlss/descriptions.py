"""Task descriptions for HLSS: visual attributes per hierarchy level, each with a few caption-like sentences.

HLSS (Watawana et al., MICCAI 2024, arXiv 2403.14616) initialises one projection head per level (patch,
slide, patient) with text embeddings of visual-attribute descriptions. The authors' sets were written for
stimulated Raman histology by prompting an LLM in four steps: the key visual attributes a pathologist uses
for the diagnosis, finer sub-attributes of each, several short sentences per attribute ("X is evident in
the pathology image"), and a distribution of the attributes over the three levels. histobench ships sets for
its H&E tasks written by hand with the same recipe (``data/descriptions/<task>.yaml``; each file says how it
was written in ``provenance``). A file looks like::

    task: tcga-nsclc
    modality: H&E, FFPE diagnostic slides
    provenance: {method: "...", date: "...", generator: "..."}
    levels:
      patch:   {Nuclear pleomorphism: ["sentence", "..."], ...}
      slide:   {...}
      patient: {...}
    classes: {...}       # optional: sanity checks only, never read by training

Attribute order is kept as written: it is the row order of the text banks (:mod:`histobench_hlss.textbank`).
Structural mistakes (a missing or empty level, an attribute without sentences, a repeated attribute) fail on
load; :meth:`Descriptions.validate` also checks every sentence against a text encoder's token limit and warns
about repeated texts (identical bank rows tie in HLSS's nearest-attribute matching, spec P11).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from histobench.components import TextEncoder
    from histobench.reporting import Reporter

LEVELS: tuple[str, ...] = ("patch", "slide", "patient")
DATA_DIR = Path(__file__).resolve().parent / "data" / "descriptions"
_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_tasks() -> list[str]:
    """Names of the description sets that ship with the plugin (``load_descriptions(name)``)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.yaml"))


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class Descriptions:
    """One task's description set: ``levels[level][attribute] -> sentences`` in file order.

    ``sha256`` hashes the canonical texts (levels in ``LEVELS`` order, attributes and sentences in file
    order); it keys the text-bank cache together with the text encoder's identity.
    """

    task: str
    levels: dict[str, dict[str, list[str]]]
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    modality: str = ""
    classes: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return descriptions_sha256(self.levels)

    def sentences(self, level: str) -> list[str]:
        """Every sentence of a level, attribute by attribute, in file order."""
        return [s for sents in self.levels[level].values() for s in sents]

    def check_structure(self) -> None:
        """Every level present and non-empty, every attribute with at least one non-empty sentence."""
        where = self.source
        if not isinstance(self.levels, dict):
            raise HistobenchError(f"descriptions {where}: 'levels' must map patch/slide/patient to attributes")
        unknown = [k for k in self.levels if k not in LEVELS]
        if unknown:
            raise HistobenchError(f"descriptions {where}: unknown level {unknown[0]!r} (levels are {', '.join(LEVELS)})")
        for level in LEVELS:
            attrs = self.levels.get(level)
            if not attrs:
                raise HistobenchError(f"descriptions {where}: level {level!r} is empty (HLSS needs attributes at "
                                      f"every level: {', '.join(LEVELS)})")
            if not isinstance(attrs, dict):
                raise HistobenchError(f"descriptions {where}: level {level!r} must map attribute names to sentence lists")
            for name, sents in attrs.items():
                if not isinstance(name, str) or not name.strip():
                    raise HistobenchError(f"descriptions {where}: level {level!r} has an attribute without a name")
                if isinstance(sents, str) or not isinstance(sents, list) or not sents:
                    raise HistobenchError(f"descriptions {where}: level {level!r}, attribute {name!r} needs a list "
                                          f"of at least one sentence")
                for s in sents:
                    if not isinstance(s, str) or not s.strip():
                        raise HistobenchError(f"descriptions {where}: level {level!r}, attribute {name!r} has an "
                                              f"empty or non-text sentence ({s!r})")

    def validate(self, text_encoder: "TextEncoder", reporter: "Reporter | None" = None) -> list[str]:
        """Check the set for ``text_encoder``: structure, every sentence within its ``max_tokens`` (counted by
        its ``count_tokens``). Returns the warnings about repeated texts (also sent to ``reporter``, or
        :func:`warnings.warn` without one); raises a one-line :class:`HistobenchError` naming file, level,
        attribute and sentence for each error."""
        self.check_structure()
        limit = text_encoder.max_tokens
        if limit is not None:
            for level in LEVELS:
                for name, sents in self.levels[level].items():
                    for s in sents:
                        n = text_encoder.count_tokens(s)
                        if n > limit:
                            raise HistobenchError(
                                f"descriptions {self.source}: level {level!r}, attribute {name!r}: the sentence "
                                f"{_short(s)!r} has {n} tokens, more than the {limit} that text encoder "
                                f"{text_encoder.name!r} takes; shorten it")
        found = self.duplicates()
        for message in found:
            if reporter is not None:
                reporter.warn(message)
            else:
                warnings.warn(message, stacklevel=2)
        return found

    def duplicates(self) -> list[str]:
        """Repeated texts within a level: a sentence used twice, or two attributes with the same sentences
        (their bank rows are identical, so nearest-attribute matching ties)."""
        out = []
        for level in LEVELS:
            seen: dict[str, str] = {}
            by_set: dict[tuple[str, ...], str] = {}
            for name, sents in self.levels[level].items():
                for s in sents:
                    key = " ".join(s.lower().split())
                    if key in seen:
                        out.append(f"descriptions {self.source}: level {level!r}: the sentence {_short(s)!r} of "
                                   f"attribute {name!r} repeats one of {seen[key]!r}")
                    else:
                        seen[key] = name
                key_set = tuple(sorted(" ".join(s.lower().split()) for s in sents))
                if key_set in by_set:
                    out.append(f"descriptions {self.source}: level {level!r}: attributes {by_set[key_set]!r} and "
                               f"{name!r} have the same sentences (identical bank rows)")
                else:
                    by_set[key_set] = name
        return out

    def summary(self) -> dict[str, Any]:
        """Counts per level, for logs and run records."""
        return {"task": self.task, "sha256": self.sha256, "source": self.source,
                **{f"{lvl}_attributes": len(self.levels[lvl]) for lvl in LEVELS},
                **{f"{lvl}_sentences": len(self.sentences(lvl)) for lvl in LEVELS}}


def descriptions_sha256(levels: dict[str, dict[str, list[str]]]) -> str:
    """SHA-256 of the canonical texts: ``[[level, [[attribute, [sentences]], ...]], ...]`` as compact UTF-8
    JSON, levels in ``LEVELS`` order, attributes and sentences in file order."""
    canon = [[lvl, [[name, list(sents)] for name, sents in levels.get(lvl, {}).items()]] for lvl in LEVELS]
    text = json.dumps(canon, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _yaml_loader():
    """A safe YAML loader that refuses repeated keys (PyYAML silently keeps the last one)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in keys:
                raise HistobenchError(f"the key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            keys.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def _resolve_path(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, Path):
        return name_or_path
    text = str(name_or_path)
    shipped = DATA_DIR / f"{text}.yaml"
    if "/" not in text and "\\" not in text and not text.endswith(_SUFFIXES):
        if shipped.is_file():
            return shipped
        if not Path(text).exists():
            raise HistobenchError(f"no task descriptions ship for {text!r} (shipped: {', '.join(shipped_tasks())}); "
                                  f"pass a descriptions file (.yaml/.json) instead")
    return Path(text)


def load_descriptions(name_or_path: str | Path) -> Descriptions:
    """A shipped task's descriptions (``"tcga-nsclc"``) or a user's file (YAML or JSON), structure-checked."""
    import yaml

    path = _resolve_path(name_or_path)
    if not path.is_file():
        raise HistobenchError(f"descriptions file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except HistobenchError as e:
        raise HistobenchError(f"descriptions {path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HistobenchError(f"descriptions {path} is not valid YAML/JSON: {first}") from None
    if not isinstance(data, dict) or "levels" not in data:
        raise HistobenchError(f"descriptions {path}: expected a mapping with 'levels' (patch, slide, patient)")
    levels = data["levels"]
    if isinstance(levels, dict):
        levels = {str(lvl): ({str(k): ([str(s).strip() if isinstance(s, str) else s for s in v]
                                       if isinstance(v, list) else v) for k, v in attrs.items()}
                             if isinstance(attrs, dict) else attrs)
                  for lvl, attrs in levels.items()}
    provenance = data.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise HistobenchError(f"descriptions {path}: 'provenance' must be a mapping (how the file was written)")
    desc = Descriptions(task=str(data.get("task") or path.stem), levels=levels,
                        provenance={str(k): v for k, v in provenance.items()}, source=str(path),
                        modality=str(data.get("modality") or ""), classes=dict(data.get("classes") or {}))
    desc.check_structure()
    # Canonical level order, whatever the file's order.
    desc.levels = {lvl: desc.levels[lvl] for lvl in LEVELS}
    return desc
