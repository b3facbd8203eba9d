"""airbench's training tricks that live in the model and the recipe: the whitening stem (known answer),
frozen tensors, per-parameter learning-rate factors, reflect-padded crops and a one-cycle schedule that
keeps the recipe's momentum, airbench's triangle schedule, and parameters that train for a limited
number of epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.models import build_model
from raymia.models.base import param_lr_scales, param_train_epochs
from raymia.models.convnets import WhiteningConv2d
from raymia.spec import AuditSpec, AugmentSpec, TrainSpec
from raymia.train.augment import AugmentDraw, Augmenter, apply_augment
from raymia.train.bank import BankContext, init_model, model_data, train_model
from raymia.train.batches import batch_passes
from raymia.train.recipe import Lookahead, make_optimizer, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

RGB = DataInfo(num_classes=10, input_shape=(3, 32, 32), kind="image")


def _correlated_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (smoothed noise plus an offset),
    like natural images: their 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 18, 18, generator=g)
    x = F.avg_pool2d(x, 3, stride=1) + 0.5 * x[:, :1, 1:-1, 1:-1]  # spatial and cross-channel correlation
    return x + 0.3


def test_whitening_stem_whitens_the_patches_it_was_fitted_to():
    stem = WhiteningConv2d(3, eps=0.0)
    x = _correlated_images(300)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    raw = patches.T @ patches / patches.shape[0]
    assert (raw - torch.diag(raw.diagonal())).abs().max() > 0.3  # correlated before
    stem.init_from_data(x)
    with torch.no_grad():
        z = F.conv2d(x.double(), stem.weight.double())  # without the bias
    z = z.permute(0, 2, 3, 1).reshape(-1, 24)
    second = z.T @ z / z.shape[0]
    torch.testing.assert_close(second[:12, :12], torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, 12:], -z[:, :12])  # the second half is the negation
    # eps shrinks each whitened direction by eigenvalue / (eigenvalue + eps)
    stem_eps = WhiteningConv2d(3, eps=0.1)
    stem_eps.init_from_data(x)
    values = torch.linalg.eigvalsh(raw).flip(0)
    z = F.conv2d(x.double(), stem_eps.weight.double()).permute(0, 2, 3, 1).reshape(-1, 24)[:, :12]
    torch.testing.assert_close((z.T @ z / z.shape[0]).diagonal(), values / (values + 0.1), atol=1e-4, rtol=0)


def test_whitening_stem_rejects_the_wrong_inputs():
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        WhiteningConv2d(3).init_from_data(torch.zeros(4, 1, 8, 8))


def test_airbench_freezes_stem_and_bn_weights_and_declares_bias_factors():
    model = build_model("airbench", {}, RGB)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "stem.weight" in buffers and "stem.weight" not in params and "stem.bias" in params
    assert "group1.2.weight" in buffers and "group1.2.bias" in params  # BatchNorm: weight frozen at 1
    assert torch.equal(buffers["group1.2.weight"], torch.ones(64))
    assert param_lr_scales(model) == {f"group{g}.{i}.bias": 64.0 for g in (1, 2, 3) for i in (2, 5)}
    assert model.scale.factor == pytest.approx(1 / 9)
    # dirac: the first in_channels filters of each 3x3 conv are the identity
    w = model.group2[4].weight  # 256 -> 256
    assert torch.equal(w[:, :, 1, 1].diagonal(), torch.ones(256)) and w[:256, :, 0, 0].abs().sum() == 0
    plain = build_model("airbench", {"whiten": False, "stem": 16, "dirac": False, "bn_weight": True,
                                     "scale": 1, "bias_lr_scale": 1}, RGB)
    assert "stem.weight" in dict(plain.named_parameters()) and plain.stem.out_channels == 16
    assert not param_lr_scales(plain) and not hasattr(plain, "scale")
    with pytest.raises(SpecError, match="whitening stem has 2 x C x 2 x 2 = 24 channels") as e:
        build_model("airbench", {"stem": 16}, RGB)
    assert e.value.where == "model.params.stem"


def _ctx(**over) -> BankContext:
    raw = {"data": {"name": "synthetic", "params": {"kind": "image", "image_size": 16, "num_train": 240, "num_test": 40}},
           "plan": {"num_models": 2, "population": 200}, "queries": ["identity"],
           "model": {"name": "airbench", "params": {"widths": [4, 6]}},
           "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.85,
                     "nesterov": True, "weight_decay": 5e-3, "schedule": "onecycle"}}
    raw.update(over)
    return BankContext.from_spec(AuditSpec.model_validate(raw))


def test_each_bank_model_whitens_with_its_own_members_and_training_keeps_frozen_tensors():
    ctx = _ctx()
    stems = []
    for m in (0, 1):
        model = init_model(ctx, m)
        md = model_data(ctx, m)
        ref = WhiteningConv2d(1)
        ref.init_from_data(ctx.data.x_train[md.index])
        torch.testing.assert_close(model.stem.weight, ref.weight)
        stems.append(model.stem.weight.clone())
    assert (stems[0] - stems[1]).abs().max() > 1e-3  # different members, different whitening
    before = init_model(ctx, 0)
    trained = train_model(ctx, 0, torch.device("cpu"))
    assert torch.equal(trained.stem.weight, before.stem.weight)
    assert torch.equal(trained.group1[2].weight, torch.ones(4))
    assert (trained.stem.bias - before.stem.bias).abs().max() > 0  # the stem's bias trains
    assert (trained.group1[2].bias - before.group1[2].bias).abs().max() > 0


def test_a_defense_that_refuses_data_dependent_init_gets_a_clear_error():
    ctx = _ctx()
    ctx.defense.data_dependent_init = False
    with pytest.raises(SpecError, match="WhiteningConv2d initialises from the members' data") as e:
        init_model(ctx, 0)
    assert e.value.where == "model.params"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_factor_scales_the_step_and_keeps_the_decay_per_step(optimizer):
    """A tensor with factor f trains as with lr x f and weight decay / f: with plain SGD (no momentum) one
    step is w - lr f g - lr wd w; with AdamW the decoupled decay lr f (wd / f) w is also unchanged."""
    recipe = TrainSpec(optimizer=optimizer, lr=0.1, momentum=0.0, weight_decay=0.01)
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.tensor([0.5, 0.25], requires_grad=True)
    opt = make_optimizer([w, b], recipe, [1.0, 8.0])
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.1, 0.8])
    g = torch.tensor([0.3, -0.1])
    w.grad, b.grad = g.clone(), g.clone()
    opt.step()
    if optimizer == "sgd":
        torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * g - 0.1 * 0.01 * torch.tensor([1.0, -2.0]))
        torch.testing.assert_close(b.detach(), torch.tensor([0.5, 0.25]) - 0.8 * g - 0.1 * 0.01 * torch.tensor([0.5, 0.25]))
    else:  # the first Adam step moves every coordinate by lr (sign of g), after decay by lr * wd
        torch.testing.assert_close(b.detach(), torch.tensor([0.5, 0.25]) * (1 - 0.1 * 0.01) - 0.8 * g.sign(),
                                   atol=1e-6, rtol=1e-5)
    # a module's declared factors reach its parameters
    model = build_model("airbench", {"widths": [4]}, RGB)
    opt = make_optimizer(model, TrainSpec(optimizer="sgd", lr=0.2, weight_decay=1e-3))
    by_key = {(round(grp["lr"], 6), grp["train_epochs"]): grp for grp in opt.param_groups}
    assert set(by_key) == {(0.2, None), (12.8, None), (0.2, 3)}
    assert {id(t) for t in by_key[12.8, None]["params"]} == {id(model.group1[2].bias), id(model.group1[5].bias)}
    assert [id(t) for t in by_key[0.2, 3]["params"]] == [id(model.stem.bias)]  # base lr, airbench's 3 epochs
    assert by_key[12.8, None]["weight_decay"] == pytest.approx(1e-3 / 64)
    with pytest.raises(ValueError, match="lr_scales: 1 factors for 2 tensors"):
        make_optimizer([w, b], recipe, [1.0])


def test_onecycle_keeps_the_recipes_momentum_and_scales_each_group():
    recipe = TrainSpec(optimizer="sgd", lr=0.4, momentum=0.85, nesterov=True, schedule="onecycle")
    w, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = make_optimizer([w, b], recipe, [1.0, 64.0])
    sched = make_scheduler(opt, recipe, 100)
    peaks = [0.0, 0.0]
    for _ in range(100):
        for i, grp in enumerate(opt.param_groups):
            assert grp["momentum"] == 0.85
            peaks[i] = max(peaks[i], grp["lr"])
        opt.step()
        sched.step()
    assert sorted(peaks) == pytest.approx([0.4, 25.6], rel=1e-3)


def test_triangle_schedule_is_airbenchs_linear_interpolation():
    """airbench: lr_schedule = np.interp(range(steps + 1), [0, int(0.23 steps), steps], [0.2, 1, 0.07]),
    step t (0-based) taking lr x lr_schedule[t]."""
    recipe = TrainSpec(optimizer="sgd", lr=2.0, momentum=0.85, schedule="triangle")
    w, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = make_optimizer([w, b], recipe, [1.0, 64.0])
    total = 250
    sched = make_scheduler(opt, recipe, total)
    expected = np.interp(np.arange(total), [0, int(0.23 * total), total], [0.2, 1.0, 0.07])
    seen = []
    for _ in range(total):
        seen.append([grp["lr"] for grp in opt.param_groups])
        opt.step()
        sched.step()
    seen = np.array(seen)
    np.testing.assert_allclose(seen[:, 0], 2.0 * expected, rtol=1e-12)
    np.testing.assert_allclose(seen[:, 1], 128.0 * expected, rtol=1e-12)
    assert seen[0, 0] == pytest.approx(0.4) and seen[57, 0] == pytest.approx(2.0) and seen.argmax(0)[0] == 57
    shaped = TrainSpec(schedule="triangle", triangle={"start": 0.0, "peak": 0.5, "end": 0.0})
    opt = make_optimizer([w], shaped)
    sched = make_scheduler(opt, shaped, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, 1e-3 * np.array([0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2]), atol=1e-15)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_parameter_with_an_epoch_limit_stops_training_there(optimizer):
    """A tensor limited to 2 epochs of 3 steps takes exactly 6 updates (momentum and weight decay
    included), then stays; the other tensors train on."""
    recipe = TrainSpec(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=0.01, schedule="cosine")
    w, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = make_optimizer([w, b], recipe, [1.0, 4.0], [None, 2])
    sched = make_scheduler(opt, recipe, 12, steps_per_epoch=3)
    history = []
    for _ in range(12):
        w.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
        sched.step()
        history.append((w.detach().clone(), b.detach().clone()))
    assert all(not torch.equal(history[t][1], history[t - 1][1]) for t in range(1, 6))  # steps 1..6 move b
    assert all(torch.equal(history[t][1], history[5][1]) for t in range(6, 12))  # then it stays
    assert all(not torch.equal(history[t][0], history[t - 1][0]) for t in range(1, 12))  # w trains throughout
    # a limit of 0 epochs: never trained
    c = torch.ones(2, requires_grad=True)
    opt = make_optimizer([c], recipe, [1.0], [0])
    sched = make_scheduler(opt, recipe, 4, steps_per_epoch=2)
    c.grad = torch.ones(2)
    opt.step()
    assert torch.equal(c.detach(), torch.ones(2))
    with pytest.raises(ValueError, match="need make_scheduler\\(..., steps_per_epoch\\)"):
        make_scheduler(make_optimizer([w, b], recipe, None, [None, 2]), recipe, 12)
    with pytest.raises(ValueError, match="train_epochs: 1 limits for 2 tensors"):
        make_optimizer([w, b], recipe, None, [3])


def test_airbench_whitening_bias_trains_for_its_epochs_only():
    """In the bank's loop, the stem's bias moves during its first epoch (whiten_bias_epochs 1) and not
    after: a model trained for 1 epoch and one trained for 3 (same seeds) end with the same stem bias,
    while everything else differs."""
    def trained(epochs: int) -> torch.nn.Module:
        spec = AuditSpec.model_validate({
            "data": {"name": "synthetic", "params": {"kind": "image", "image_size": 16, "num_train": 200, "num_test": 20}},
            "plan": {"num_models": 2, "population": 200},
            "model": {"name": "airbench", "params": {"widths": [4], "whiten_bias_epochs": 1}},
            "train": {"epochs": epochs, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.85,
                      "nesterov": True, "weight_decay": 5e-4, "schedule": "constant"}})
        return train_model(BankContext.from_spec(spec), 0, torch.device("cpu"))

    one, three = trained(1), trained(3)
    initial = init_model(BankContext.from_spec(AuditSpec.model_validate({
        "data": {"name": "synthetic", "params": {"kind": "image", "image_size": 16, "num_train": 200, "num_test": 20}},
        "plan": {"num_models": 2, "population": 200},
        "model": {"name": "airbench", "params": {"widths": [4], "whiten_bias_epochs": 1}},
        "train": {"epochs": 1, "batch_size": 32}})), 0)
    assert not torch.equal(one.stem.bias, initial.stem.bias)  # trained in epoch 1
    torch.testing.assert_close(three.stem.bias, one.stem.bias, atol=0, rtol=0)  # and not after
    assert not torch.equal(three.head.weight, one.head.weight)
    assert param_train_epochs(build_model("airbench", {}, RGB)) == {"stem.bias": 3}
    assert not param_train_epochs(build_model("airbench", {"whiten": False}, RGB))


def test_reflect_padded_crop_is_a_shifted_mirror_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    draw = AugmentDraw(flip=None, offsets=torch.tensor([[0, 4], [2, 2]]))
    out = apply_augment(x, draw, AugmentSpec(crop=2, pad="reflect"))
    torch.testing.assert_close(out[1], x[1])  # offset (2, 2) of padding 2: no shift
    # offset (0, 4): rows shifted down by 2 (mirrored rows 2, 1 on top), columns shifted left by 2
    rows, cols = [2, 1, 0, 1, 2], [2, 3, 4, 3, 2]
    torch.testing.assert_close(out[0, 0], x[0, 0][rows][:, cols])
    zeros = apply_augment(x, draw, AugmentSpec(crop=2))
    assert zeros[0, 0, 0].abs().sum() == 0  # zero padding: the top rows are empty
    with pytest.raises(ValueError, match="pad reflect needs crop < the image size"):
        apply_augment(x, AugmentDraw(None, torch.zeros(2, 2, dtype=torch.long)), AugmentSpec(crop=5, pad="reflect"))


def test_alternating_flips_flip_every_image_the_other_way_on_each_pass():
    """airbench's alternating flip: image i on pass p is flipped iff mask[i] xor (p odd), mask a random half
    drawn once; random flips (the default) follow no such pattern."""
    n = 64
    spec = AugmentSpec(hflip=True, flip="alternate")
    aug = Augmenter(spec, n, torch.Generator().manual_seed(3))
    stream = batch_passes(n, 24, torch.Generator().manual_seed(4))
    x = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None, None] * torch.tensor([1.0, 2.0, 3.0])
    seen: dict[int, list[bool]] = {i: [] for i in range(n)}
    for _ in range(16):  # 384 draws: 6 passes
        b, passes = next(stream)
        out = aug(x[b], b, passes)
        flipped = out[:, 0, 0, 0] == 3 * (b + 1)  # image i's row reversed: it starts with 3 (i + 1)
        assert bool((flipped | (out[:, 0, 0, 0] == b + 1)).all())  # flipped or not, nothing else
        for i, f in zip(b.tolist(), flipped.tolist()):
            seen[i].append(f)
    first = torch.tensor([seen[i][0] for i in range(n)])
    assert torch.equal(first, aug.mask) and 16 < int(first.sum()) < 48  # pass 0: the mask, about half
    for i in range(n):
        assert len(seen[i]) == 6 and all(a != b for a, b in zip(seen[i], seen[i][1:]))  # alternates
    again = Augmenter(spec, n, torch.Generator().manual_seed(3))  # seeded: the same mask
    assert torch.equal(again.mask, aug.mask)
    rand = Augmenter(AugmentSpec(hflip=True), n, torch.Generator().manual_seed(3))
    assert rand.mask is None
    draws = [rand.draw(torch.arange(n), torch.full((n,), p)).flip for p in range(6)]
    assert any(bool((a == b).any()) for a, b in zip(draws, draws[1:]))  # random: repeats happen
    with pytest.raises(SpecError, match="flip: alternate"):
        AugmentSpec(flip="alternate")


def test_lookahead_known_answer():
    """airbench94's loop, hand-rolled on one scalar whose optimizer adds 1 per step: 5 epochs of 4 steps;
    from epoch 3 (0-based) on, at every 5th step the average starts (first time) or moves,
    ema <- ema + (1 - d)(w - ema), d = 0.95^5 (t/20)^3, and w <- ema; after each epoch once started, w <- ema."""
    w = torch.tensor([0.0])
    ahead = Lookahead([w, torch.tensor([3])], total_steps=20, steps_per_epoch=4)  # integers are left alone
    assert len(ahead.tensors) == 1
    ema, ref, t, trace = None, 0.0, 0, []
    for epoch in range(5):
        for _ in range(4):
            w += 1.0
            ref += 1.0
            t += 1
            ahead.step(t)
            if epoch >= 3 and t % 5 == 0:
                if ema is None:
                    ema = ref
                else:
                    ema = ema + (1 - 0.95 ** 5 * (t / 20) ** 3) * (ref - ema)
                    ref = ema
            if t % 4 == 0 and ema is not None:
                ref = ema
            assert w.item() == pytest.approx(ref, rel=1e-6), t
            trace.append(w.item())
    ahead.finish()
    # the average starts at step 15 (epoch 3), pulls w back to 15 at the end of epoch 3 (step 16), and at
    # step 20 moves a (1 - 0.774) share of the way towards w
    assert ema == 15.0 + (1 - 0.95 ** 5) * (19.0 - 15.0)
    assert trace[:15] == [float(i) for i in range(1, 16)] and trace[15] == 15.0
    assert w.item() == pytest.approx(ema, rel=1e-6)


def test_lookahead_is_accepted_for_defenses_that_train_in_fit_and_refused_when_it_would_never_act():
    """Every defense trains on the one step loop, which has the lookahead (tests/test_loop.py checks that
    it acts for each); a recipe too short for it to start is refused."""
    raw = {"plan": {"num_models": 2, "population": 100}, "model": {"name": "mlp", "params": {"hidden": [8]}},
           "train": {"epochs": 4, "lookahead": True}, "defense": {"name": "advreg"}}
    assert BankContext.from_spec(AuditSpec.model_validate(raw)).recipe.lookahead
    raw.pop("defense")
    raw["train"]["epochs"] = 3
    with pytest.raises(SpecError, match="lookahead starts after epoch 3 .* set epochs >= 4"):
        AuditSpec.model_validate(raw)
