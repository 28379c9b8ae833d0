"""Text banks: one unit vector per visual attribute and level, the rows HLSS initialises its heads with.

HLSS (Watawana et al., MICCAI 2024, arXiv 2403.14616; spec §2.3): for attribute k of level ℓ with sentences
s_1..s_m, ``e_k = normalise(mean_j normalise(f_text(s_j)))`` and ``T_ℓ = [e_1; ...; e_K]`` in the order of the
descriptions file. The text encoder is frozen and run once, under ``torch.no_grad()`` (the authors' code kept
autograd on, P13).

Banks are cached per (descriptions hash, text-encoder identity) as one file in ``cache_dir``: a ``torch.save``
of tensors and plain data (loaded with ``weights_only=True``, so nothing executes) that holds the banks, every
sentence's embedding, the description texts, the encoder's identity and the SHA-256 of the texts. The same
file is what the ``cached`` text encoder reads (``-o text_encoder.path=FILE``). Loading re-hashes the stored
texts and compares both hashes with what the caller expects; a mismatch is a one-line error.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histobench.errors import HistobenchError
from histobench_hlss.descriptions import LEVELS, Descriptions, descriptions_sha256

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from histobench.components import TextEncoder
    from histobench.reporting import Reporter

FORMAT = "histobench-hlss-textbank"
VERSION = 1
ENCODE_CHUNK = 64


@dataclass
class TextBank:
    """One level's attribute bank: ``vectors[k]`` (float32, unit norm) embeds attribute ``names[k]``."""

    level: str
    names: list[str]
    vectors: "torch.Tensor"
    identity: str
    descriptions_sha256: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.names)


def bank_file_name(descriptions_sha: str, identity: str) -> str:
    """The cache file's name: both hashes, plus a readable slug of the identity."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:40]
    ident = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"textbank-{descriptions_sha[:16]}-{slug}-{ident}.pt"


def encode_sentences(texts: list[str], text_encoder: "TextEncoder", reporter: "Reporter | None" = None,
                     what: str = "text bank") -> "torch.Tensor":
    """``[n, D]`` float32 unit rows for ``texts`` (encoded in chunks, under ``no_grad``, rows re-normalised)."""
    import torch
    import torch.nn.functional as F

    from histobench.reporting import Reporter

    reporter = reporter or Reporter()
    parts = []
    with torch.no_grad(), reporter.stage(f"{what} ({text_encoder.name})", total=len(texts), unit="sentences") as st:
        for i in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[i:i + ENCODE_CHUNK]
            out = text_encoder.encode(chunk)
            if tuple(out.shape) != (len(chunk), text_encoder.dim):
                raise HistobenchError(f"text encoder {text_encoder.name!r} returned shape {tuple(out.shape)} for "
                                      f"{len(chunk)} sentences, not ({len(chunk)}, {text_encoder.dim})")
            parts.append(out.detach().to("cpu", torch.float32).clone())
            st.advance(len(chunk))
    if not parts:
        return torch.zeros(0, text_encoder.dim)
    return F.normalize(torch.cat(parts), dim=1)


def build_banks(descriptions: Descriptions, text_encoder: "TextEncoder",
                reporter: "Reporter | None" = None) -> tuple[dict[str, TextBank], list[str], "torch.Tensor"]:
    """The banks, plus the unique sentences (file order) and their unit embeddings."""
    import torch
    import torch.nn.functional as F

    sentences = list(dict.fromkeys(s for lvl in LEVELS for s in descriptions.sentences(lvl)))
    emb = encode_sentences(sentences, text_encoder, reporter, what=f"text bank {descriptions.task}")
    row = {s: i for i, s in enumerate(sentences)}
    sha, identity = descriptions.sha256, text_encoder.identity()
    banks = {}
    with torch.no_grad():
        for lvl in LEVELS:
            attrs = descriptions.levels[lvl]
            rows = [emb[[row[s] for s in sents]].mean(dim=0) for sents in attrs.values()]
            banks[lvl] = TextBank(lvl, list(attrs), F.normalize(torch.stack(rows), dim=1).contiguous(), identity, sha)
    return banks, sentences, emb


def _payload(descriptions: Descriptions, text_encoder: "TextEncoder", banks: dict[str, TextBank],
             sentences: list[str], emb: "torch.Tensor") -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "task": descriptions.task,
        "identity": text_encoder.identity(), "encoder": text_encoder.name, "dim": int(emb.shape[1]),
        "shares_image_space": bool(text_encoder.shares_image_space),
        "descriptions_sha256": descriptions.sha256,
        "descriptions": {lvl: {k: list(v) for k, v in descriptions.levels[lvl].items()} for lvl in LEVELS},
        "sentences": list(sentences), "sentence_vectors": emb.contiguous(),
        "banks": {lvl: {"names": list(b.names), "vectors": b.vectors} for lvl, b in banks.items()},
    }


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    buf = io.BytesIO()  # saved in memory first: the archive's inner name is then fixed, so the bytes are too
    torch.save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def write_bank_file(path: str | Path, descriptions: Descriptions, text_encoder: "TextEncoder",
                    reporter: "Reporter | None" = None) -> dict[str, TextBank]:
    """Encode ``descriptions`` and write the bank file that the ``cached`` text encoder reads."""
    banks, sentences, emb = build_banks(descriptions, text_encoder, reporter)
    _atomic_save(_payload(descriptions, text_encoder, banks, sentences, emb), Path(path))
    return banks


def read_bank_file(path: str | Path, descriptions_sha: str | None = None, identity: str | None = None) -> dict[str, Any]:
    """Load a bank file safely (``weights_only=True``) and check it: format, shapes, the stored texts' hash,
    and, when given, the descriptions hash and encoder identity the caller expects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise HistobenchError(f"text-bank file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's file problem
        raise HistobenchError(f"text-bank file {path} cannot be read ({type(e).__name__}); write it with "
                              f"histobench_hlss.textbank.write_bank_file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HistobenchError(f"{path} is not a histobench text-bank file")
    if data.get("version") != VERSION:
        raise HistobenchError(f"text-bank file {path} has version {data.get('version')!r}; this histobench reads {VERSION}")
    stored = data["descriptions_sha256"]
    actual = descriptions_sha256(data["descriptions"])
    if actual != stored:
        raise HistobenchError(f"text-bank file {path}: its descriptions hash {stored[:12]}… does not match its own "
                              f"texts ({actual[:12]}…); the file was altered, rebuild it")
    if descriptions_sha is not None and stored != descriptions_sha:
        raise HistobenchError(f"text-bank file {path} was built from descriptions {stored[:12]}… ({data['task']}), "
                              f"not the {descriptions_sha[:12]}… asked for; rebuild it for these descriptions")
    if identity is not None and data["identity"] != identity:
        raise HistobenchError(f"text-bank file {path} was built by text encoder {data['identity']!r}, not "
                              f"{identity!r}; rebuild it with this encoder")
    vec = data["sentence_vectors"]
    if tuple(vec.shape) != (len(data["sentences"]), data["dim"]):
        raise HistobenchError(f"text-bank file {path}: {len(data['sentences'])} sentences but vectors of shape "
                              f"{tuple(vec.shape)}")
    for lvl in LEVELS:
        bank = data["banks"].get(lvl)
        names = list(data["descriptions"].get(lvl, {}))
        if bank is None or list(bank["names"]) != names or tuple(bank["vectors"].shape) != (len(names), data["dim"]):
            raise HistobenchError(f"text-bank file {path}: the {lvl!r} bank does not match its descriptions")
    return data


def _banks_from(data: dict[str, Any]) -> dict[str, TextBank]:
    return {lvl: TextBank(lvl, list(data["banks"][lvl]["names"]), data["banks"][lvl]["vectors"], data["identity"],
                          data["descriptions_sha256"]) for lvl in LEVELS}


def text_banks(descriptions: Descriptions, text_encoder: "TextEncoder", cache_dir: Path | None = None,
               reporter: "Reporter | None" = None) -> dict[str, TextBank]:
    """Per level (``patch``, ``slide``, ``patient``), the attribute bank of ``descriptions`` under
    ``text_encoder``; read from / written to ``cache_dir`` when given (one file per descriptions hash and
    encoder identity). Validates the descriptions for the encoder first."""
    sha, identity = descriptions.sha256, text_encoder.identity()
    descriptions.validate(text_encoder, reporter)
    own = getattr(text_encoder, "descriptions_sha256", None)  # the ``cached`` encoder knows its texts' hash
    if own is not None and own != sha:
        raise HistobenchError(f"text encoder {text_encoder.name!r} holds a bank of descriptions {own[:12]}…, not "
                              f"{sha[:12]}… ({descriptions.task}, {descriptions.source}); rebuild the bank file")
    if own is not None:  # the file already holds these banks, bit for bit
        return text_encoder.stored_banks()
    path = Path(cache_dir) / bank_file_name(sha, identity) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return _banks_from(read_bank_file(path, sha, identity))
        except HistobenchError as err:  # a file of the cache: say how to get a good one back
            raise HistobenchError(f"{err} (a cached text bank: delete it and the next run rebuilds it)") from None
    banks, sentences, emb = build_banks(descriptions, text_encoder, reporter)
    if path is not None:
        _atomic_save(_payload(descriptions, text_encoder, banks, sentences, emb), path)
    return banks


DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


def write_demo_bank() -> Path:
    """Rebuild the shipped demo bank (``data/demo/bank-k8-hashing.pt``, the ``cached`` encoder's demo preset)
    from ``data/demo/descriptions-k8.yaml`` with the core ``hashing`` text encoder."""
    from histobench.registry import create
    from histobench_hlss.descriptions import load_descriptions

    path = DEMO_DIR / "bank-k8-hashing.pt"
    write_bank_file(path, load_descriptions(DEMO_DIR / "descriptions-k8.yaml"), create("text_encoder", "hashing"))
    return path


if __name__ == "__main__":  # python -m histobench_hlss.textbank
    print(write_demo_bank())
