"""The batch contract: what a pretext declares in ``requires`` is what its batches hold, through the real loop."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from histobench import hookimpl
from histobench.components import CohortMeta, PretrainContext, Pretext, StrictOptions
from histobench.errors import HistobenchError
from histobench.pipeline import RunSpec, resolve
from histobench.pretrain.samplers import PatientSampler, TileSampler
from histobench.testing import check_pretext

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Recording(Pretext):
    """A minimal pretext: the encoder's squared output as the loss; it keeps every batch it is given."""

    seen: ClassVar[list[dict[str, Any]]] = []
    contexts: ClassVar[list[PretrainContext]] = []

    class Options(StrictOptions):
        pass

    def setup(self, encoder, ctx):
        self.encoder, self.ctx = encoder, ctx
        type(self).contexts.append(ctx)

    def student_modules(self):
        return {"encoder": self.encoder}

    def training_step(self, batch, step):
        type(self).seen.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                for k, v in batch.items()})
        x = batch["images"].float() / 255.0
        return {"loss": self.encoder(x).pow(2).mean()}

    def state_dict(self):
        return {"encoder": self.encoder.state_dict()}

    def load_state_dict(self, state):
        self.encoder.load_state_dict(state["encoder"])

    def trained_encoder(self):
        return self.encoder


class MaskPretext(_Recording):
    """Needs nuclei masks."""

    name = "test-masks"
    requires = frozenset({"tiles", "masks"})
    seen: ClassVar[list] = []
    contexts: ClassVar[list] = []


class PatientPretext(_Recording):
    """Needs whole patients."""

    name = "test-hierarchy"
    requires = frozenset({"tiles", "hierarchy"})
    seen: ClassVar[list] = []
    contexts: ClassVar[list] = []

    def hierarchy_shape(self):
        return (2, 3)


class TextPretext(_Recording):
    """Needs a text encoder."""

    name = "test-text"
    requires = frozenset({"tiles", "text"})
    seen: ClassVar[list] = []
    contexts: ClassVar[list] = []


class NoSegmenterPretext(_Recording):
    """Needs masks and names no segmenter of its own, not even for demos."""

    name = "test-masks-no-default"
    requires = frozenset({"tiles", "masks"})
    demo_segmenter = None


class OddPretext(_Recording):
    name = "test-odd"
    requires = frozenset({"tiles", "smells"})


class _Plugin:
    @hookimpl
    def register_pretexts(self, register):
        for cls in (MaskPretext, PatientPretext, TextPretext, NoSegmenterPretext, OddPretext):
            register(cls)


@pytest.fixture
def test_pretexts(register_plugin):
    for cls in (MaskPretext, PatientPretext, TextPretext):
        cls.seen.clear()
        cls.contexts.clear()
    register_plugin(_Plugin(), "test-batch-contract")


def test_check_pretext_gives_masks_to_a_pretext_that_requires_them(test_pretexts):
    check_pretext("test-masks")
    batch = MaskPretext.seen[0]
    assert batch["instances"].dtype == torch.int32 and batch["types"].dtype == torch.uint8
    assert batch["instances"].shape == (8, *batch["images"].shape[-2:])
    assert batch["instances"].max() > 0 and (batch["instances"] == 0).any()  # nuclei and background


def test_check_pretext_gives_whole_patients_to_a_hierarchy_pretext(test_pretexts):
    check_pretext("test-hierarchy")
    batch = PatientPretext.seen[0]
    assert len(batch["images"]) == 2 * 2 * 3  # 2 patients x 2 slides x 3 tiles
    groups = batch["patient_index"].view(2, 6)
    assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
    cohort = PatientPretext.contexts[0].cohort
    assert cohort is not None and cohort.n_patients > 1 and not hasattr(cohort, "labels")


def test_a_text_pretext_gets_the_text_encoder_in_its_context(test_pretexts):
    check_pretext("test-text")
    enc = TextPretext.contexts[0].text_encoder
    assert enc is not None and enc.name == "hashing"
    assert enc.encode(["a tumour"]).shape == (1, enc.dim)


def test_patient_sampler_draws_whole_patients_with_wrap_around():
    # patient a: slides 0 (one tile) and 1 (three tiles); patient b: slide 2 only; patient c: slide 3
    slide_index = np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    cohort = CohortMeta(("s0", "s1", "s2", "s3"), ("a", "a", "b", "c"))
    sampler = PatientSampler(slide_index, cohort, batch_size=3, slides=2, tiles=2, seed=7)
    assert sampler.steps_per_epoch == 1 and sampler.images_per_batch == 12
    (batch,) = sampler.batches(epoch=0)
    assert len(batch) == 12
    patients = np.array([cohort.patient_index[slide_index[i]] for i in batch]).reshape(3, 4)
    assert (patients == patients[:, :1]).all() and sorted(patients[:, 0]) == [0, 1, 2]
    for row in np.array(batch).reshape(3, 2, 2):  # per patient: S slides x P tiles
        for tiles in row:
            assert len({slide_index[i] for i in tiles}) == 1  # the P tiles of a slide come from that slide
    b_items = np.array(batch).reshape(3, 4)[patients[:, 0] == 1][0]
    assert set(slide_index[b_items]) == {2}  # a one-slide patient repeats its slide
    assert sampler.batches(0) == sampler.batches(0) and sampler.batches(0) != sampler.batches(1)
    # two ranks take complementary shares of the same global batch
    with pytest.raises(HistobenchError, match="divisible"):
        sampler.batches(0, rank=0, world=2)
    even = PatientSampler(slide_index, cohort, batch_size=2, slides=2, tiles=2, seed=7)
    r0, r1 = even.batches(0, 0, 2)[0], even.batches(0, 1, 2)[0]
    assert r0 + r1 == even.batches(0)[0]


def test_tile_sampler_matches_the_old_epoch_permutation():
    from histobench.pretrain.trainer import epoch_batches

    sampler = TileSampler(50, 8, seed=3)
    assert sampler.steps_per_epoch == 6
    assert sampler.batches(2) == epoch_batches(50, 8, 3, 2)
    flat = [i for b in sampler.batches(2) for i in b]
    assert len(set(flat)) == 48


@pytest.mark.parametrize("spec, message", [
    (dict(pretext="test-masks-no-default"), "requires nuclei masks but no segmenter was named"),
    (dict(pretext="test-odd"), "requires smells, which no stage"),
    (dict(pretext="dino", segmenter="oracle"), "does not use a segmenter"),
    (dict(pretext="dino", options={"text_encoder": {"dim": 8}}), "does not use a text encoder"),
    (dict(pretext="none", protocol="no-such-protocol"), "unknown protocol 'no-such-protocol'"),
    (dict(pretext="none", options={"eval": {"top_k": 3}}), "option eval.top_k"),
    (dict(pretext="none", pretrain_task="tcga-brca"), "need a --pretext"),
    (dict(pretext="dino", pretrain_task="tcga-brcx"), "unknown task 'tcga-brcx'"),
    (dict(pretext="none", options={"analysis": {"k": 1}}), "analysis. options are for histobench analyze"),
])
def test_a_requirement_no_stage_can_meet_is_one_error_at_resolve(test_pretexts, spec, message):
    with pytest.raises(HistobenchError, match=message):
        resolve(RunSpec(task="tcga-nsclc", demo=True, **spec))


def test_resolve_picks_the_demo_segmenter_and_text_encoder(test_pretexts):
    comps = resolve(RunSpec(task="tcga-nsclc", pretext="test-text", demo=True,
                            options={"text_encoder": {"dim": 16}}))
    assert comps.text_encoder.name == "hashing" and comps.text_encoder.dim == 16
    assert comps.resolved()["text_encoder"] == {"name": "hashing", "dim": 16, "max_words": 77}
    assert comps.protocol.name == "frozen-mil" and comps.resolved()["protocol"] == {"name": "frozen-mil"}


def test_a_masks_pretext_gets_the_oracle_cache_through_the_real_loop(test_pretexts, tmp_path):
    """`histobench pretrain` on the demo cohort: segmentation stage (oracle) -> mask cache -> batches."""
    from typer.testing import CliRunner

    from histobench.cli.app import build_app
    from histobench.segment import SegmentationCache

    result = CliRunner().invoke(build_app(), [
        "pretrain", "--pretext", "test-masks", "--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path),
        "-o", "task.demo_patients=6", "-o", "task.demo_slide_px=1024", "-o", "train.epochs=1",
        "-o", "train.batch_size=16", "-o", "train.num_workers=0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    ctx = MaskPretext.contexts[-1]
    assert ctx.segmentation["identity"].startswith("oracle-") and ctx.segmentation["tiles"] > 0
    cache = SegmentationCache(ctx.segmentation["root"])
    checked = 0
    for batch in MaskPretext.seen:
        assert batch["instances"].shape == (16, *batch["images"].shape[-2:])
        for i in range(0, 16, 5):
            slide_id = ctx.cohort.slide_ids[int(batch["slide_index"][i])]
            with cache.slide(slide_id) as seg:
                inst, types = seg.tile(int(batch["tile_index"][i]))
            assert np.array_equal(batch["instances"][i].numpy(), inst.astype(np.int32))
            assert np.array_equal(batch["types"][i].numpy(), types)
            checked += 1
    assert checked >= 4 and any(b["instances"].max() > 0 for b in MaskPretext.seen)
