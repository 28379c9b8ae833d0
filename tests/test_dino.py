"""DINO: loss values, centre, gradients, EMA, last-layer freeze, state round trip, determinism, learning."""

import copy
import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from histobench.components import PretrainContext  # noqa: E402
from histobench_dino.pretext import DINO  # noqa: E402
from histobench_timm.encoder import TimmEncoder  # noqa: E402

TINY_ENCODER = {"model_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}}
TINY_DINO = {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2}


def make(seed=0, total_steps=40, steps_per_epoch=10, init_seed=None, **options):
    enc = TimmEncoder(TimmEncoder.preset("demo"), **TINY_ENCODER)
    pre = DINO(DINO.preset("demo"), **{**TINY_DINO, **options})
    torch.manual_seed(seed if init_seed is None else init_seed)
    ctx = PretrainContext(device=torch.device("cpu"), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                          epochs=total_steps // steps_per_epoch, batch_size=8, encoder_component=enc, seed=seed)
    pre.setup(enc.build(), ctx)
    return pre


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)}


def optimizer(pre, lr=1e-3):
    params = [p for m in pre.student_modules().values() for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.04), params


def train(pre, steps, data=None, start=0, opt=None):
    opt = opt or optimizer(pre)[0]
    losses = []
    for step in range(start, start + steps):
        torch.manual_seed(1000 + step)  # what the trainer does (drop path draws from the global RNG)
        out = pre.training_step(data or batch(), step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        pre.before_optimizer_step(step)
        opt.step()
        pre.after_optimizer_step(step)
        losses.append(out["loss"].item())
    return losses


# ------------------------------------------------------------------------------------------------ loss


def test_loss_of_uniform_outputs_is_log_k():
    from histobench.ssl.losses import DINOLoss

    k = 512
    loss_fn = DINOLoss(k)
    s = [torch.zeros(4, k) for _ in range(4)]
    t = [torch.zeros(4, k) for _ in range(2)]
    loss, stats = loss_fn(s, t, teacher_temp=0.04)
    assert float(loss) == pytest.approx(math.log(k), rel=1e-6)
    assert float(stats["teacher_entropy"]) == pytest.approx(math.log(k), rel=1e-6)


def test_loss_with_a_random_head_is_near_log_k():
    from histobench.ssl.heads import DINOProjectionHead
    from histobench.ssl.losses import DINOLoss

    torch.manual_seed(0)
    k = 4096
    head = DINOProjectionHead(48, k, hidden_dim=256, bottleneck_dim=256, norm_last_layer=True)
    feats = [torch.randn(32, 48) for _ in range(4)]  # independent views: no agreement to exploit yet
    outs = [head(f) for f in feats]
    assert outs[0].abs().max() <= 1 + 1e-5  # cosine similarities
    loss, _ = DINOLoss(k)(outs, outs[:2], teacher_temp=0.04)
    assert abs(loss.item() - math.log(k)) < 0.05 * math.log(k)


def test_loss_pairs_skip_the_same_view():
    from histobench.ssl.losses import DINOLoss

    k = 8
    t = [torch.randn(3, k), torch.randn(3, k)]
    scale = 0.1 / 0.04  # student logits whose softmax at 0.1 equals the teacher's at 0.04
    same = DINOLoss(k)([t[0] * scale, t[1] * scale], t, teacher_temp=0.04)[0]
    swapped = DINOLoss(k)([t[1] * scale, t[0] * scale], t, teacher_temp=0.04)[0]
    # teacher view i is only compared with student views j != i: the swapped student matches exactly,
    # so its loss is the teacher entropy (KL = 0)
    entropy = sum(float(-(p * p.log()).sum(-1).mean()) for p in (torch.softmax(x / 0.04, -1) for x in t)) / 2
    assert float(swapped) == pytest.approx(entropy, rel=1e-5)
    assert float(same) > float(swapped) + 1e-3


def test_center_update():
    from histobench.ssl.losses import DINOLoss

    loss_fn = DINOLoss(6, center_momentum=0.9)
    t = [torch.randn(4, 6), torch.randn(4, 6)]
    loss_fn([torch.randn(4, 6)] * 3, t, teacher_temp=0.04)
    expected = 0.1 * torch.cat(t).mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected, atol=1e-6)
    loss_fn([torch.randn(4, 6)] * 3, t, teacher_temp=0.04)
    assert torch.allclose(loss_fn.center, 0.9 * expected + 0.1 * torch.cat(t).mean(0, keepdim=True), atol=1e-6)


# --------------------------------------------------------------------------------------------- pretext


def test_step_outputs_and_gradients():
    pre = make()
    assert set(pre.student_modules()) == {"backbone", "head"}
    out = pre.training_step(batch(), 0)
    assert set(out) == {"loss", "teacher_entropy", "teacher_temp", "momentum"}
    assert out["teacher_temp"] == pytest.approx(0.04) and out["momentum"] == pytest.approx(0.996)
    assert math.isfinite(out["loss"].item()) and 0 < out["loss"].item() < 2 * math.log(256)
    assert not torch.equal(pre.loss.center, torch.zeros_like(pre.loss.center))
    out["loss"].backward()
    assert all(p.grad is None for p in pre.teacher.parameters())
    assert all(not p.requires_grad for p in pre.teacher.parameters())
    backbone_grads = [p.grad for p in pre.student.backbone.parameters() if p.grad is not None]
    assert backbone_grads and sum(float(g.abs().sum()) for g in backbone_grads) > 0


def test_student_has_drop_path_and_teacher_does_not():
    pre = make(drop_path_rate=0.2)
    assert type(pre.student.backbone.model.blocks[-1].drop_path1).__name__ == "DropPath"
    assert all(type(b.drop_path1).__name__ == "Identity" for b in pre.teacher.backbone.model.blocks)


def test_ema_moves_the_teacher_by_exactly_one_minus_m():
    pre = make()
    train(pre, 1)
    before = [p.detach().clone() for p in pre.teacher.parameters()]
    with torch.no_grad():
        for p in pre.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    step = 5
    m = float(pre.ema.schedule[step])
    pre.after_optimizer_step(step)
    for t_old, t_new, s in zip(before, pre.teacher.parameters(), pre.student.parameters()):
        assert torch.allclose(t_new, t_old + (1 - m) * (s - t_old), atol=1e-7)
    assert pre.ema.schedule[-1] == pytest.approx(1.0) and pre.teacher is pre.ema.module


def test_last_layer_is_frozen_during_the_first_epoch():
    pre = make(total_steps=20, steps_per_epoch=10, freeze_last_layer_epochs=1)
    last = pre.student.head.last_layer_v
    out = pre.training_step(batch(), 9)
    out["loss"].backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    pre.before_optimizer_step(9)
    assert last.grad is None
    out = pre.training_step(batch(), 10)
    pre.student.zero_grad(set_to_none=True)
    out["loss"].backward()
    pre.before_optimizer_step(10)
    assert last.grad is not None and last.grad.abs().sum() > 0


def test_teacher_temperature_warm_up():
    pre = make(total_steps=40, steps_per_epoch=10, warmup_teacher_temp=0.02, teacher_temp=0.06,
               warmup_teacher_temp_epochs=2)
    temps = pre.teacher_temp_schedule
    assert len(temps) == 40
    assert temps[0] == pytest.approx(0.02) and temps[19] == pytest.approx(0.06) and temps[-1] == pytest.approx(0.06)
    assert all(a <= b for a, b in zip(temps[:-1], temps[1:]))


def test_state_dict_round_trip_restores_the_loss():
    pre = make()
    opt, _ = optimizer(pre)
    train(pre, 2, opt=opt)
    state = copy.deepcopy(pre.state_dict())  # state_dict() holds live tensors, as nn.Module's does
    assert set(state) == {"student", "teacher", "loss"}
    torch.manual_seed(7)
    expected = pre.training_step(batch(seed=3), 2)["loss"].item()
    fresh = make(init_seed=99)  # same run seed (augmentation), other weights
    fresh.load_state_dict(state)
    assert torch.equal(fresh.loss.center, state["loss"]["center"])
    torch.manual_seed(7)
    got = fresh.training_step(batch(seed=3), 2)["loss"].item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_fixed_seed_gives_identical_losses():
    a = train(make(seed=1), 3)
    b = train(make(seed=1), 3)
    c = train(make(seed=2), 3)
    assert a == b
    assert a != c


def test_student_teacher_disagreement_decreases_on_a_tiny_batch():
    # The loss is H(P_t) + KL(P_t || P_s) averaged over view pairs. Early in training, centring raises the
    # teacher entropy H(P_t) (the random network's outputs are sharp on a few dimensions), so the total loss
    # can rise; the part that training minimises, KL = loss - teacher_entropy, must fall.
    pre = make(total_steps=30, steps_per_epoch=30, freeze_last_layer_epochs=0, drop_path_rate=0.0)
    opt, _ = optimizer(pre)
    data = batch(8, seed=5)
    kl = []
    for step in range(30):
        torch.manual_seed(1000 + step)
        out = pre.training_step(data, step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        pre.before_optimizer_step(step)
        opt.step()
        pre.after_optimizer_step(step)
        kl.append(out["loss"].item() - float(out["teacher_entropy"]))
    assert min(kl) >= -1e-4
    assert sum(kl[-5:]) / 5 < 0.75 * sum(kl[:5]) / 5, kl


def test_trained_encoder_is_the_teacher_backbone():
    pre = make()
    enc = pre.trained_encoder()
    assert enc is pre.teacher.backbone
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 48)


def test_listing_pretexts_does_not_import_torch():
    code = (
        "import sys; import histobench_dino, histobench_timm; "
        "from histobench_dino.pretext import DINO; DINO.train_options('demo'); DINO(DINO.preset('demo')); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_and_train_defaults():
    o = DINO().options
    assert (o.out_dim, o.hidden_dim, o.bottleneck_dim, o.n_local_crops) == (65536, 2048, 256, 8)
    assert (o.student_temp, o.teacher_temp, o.momentum_teacher, o.center_momentum) == (0.1, 0.04, 0.996, 0.9)
    t = DINO.train_options()
    assert (t.lr, t.weight_decay, t.weight_decay_end, t.clip_grad, t.warmup_epochs) == (5e-4, 0.04, 0.4, 3.0, 10)
    assert DINO.train_options("demo").batch_size == 64


def test_old_import_paths_serve_the_core_parts():
    from histobench.ssl import heads, losses
    from histobench_dino import heads as old_heads
    from histobench_dino import loss as old_loss

    assert old_heads.DINOProjectionHead is heads.DINOProjectionHead and old_heads.BackboneWithHead is heads.BackboneWithHead
    assert old_loss.DINOLoss is losses.DINOLoss


def test_contract_check_through_the_trainer():
    from histobench.testing import check_pretext

    losses = check_pretext("dino")
    assert len(losses) == 3
