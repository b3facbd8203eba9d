"""The pack trainer: model k trained in a vmapped pack equals the same model trained alone (same seed,
same batches, same augmentation draws, same schedule), BatchNorm running statistics included."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from raymia.spec import AuditSpec
from raymia.train.bank import (
    BankContext,
    pack_query_logits,
    train_model,
    train_models_packed,
    train_pack,
)
from raymia.train.batches import batch_passes, batch_stream
from raymia.train.infer import query_logits

CPU = torch.device("cpu")


def ctx_for(**over) -> BankContext:
    raw = {"plan": {"num_models": 4, "population": 200},
           "train": {"epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                     "weight_decay": 5e-4, "schedule": "cosine"},
           "model": {"name": "mlp", "params": {"hidden": [32]}}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if k in ("plan", "train", "bank") else v
    return BankContext.from_spec(AuditSpec.model_validate(raw))


CASES = {
    "mlp-sgd-cosine": {},
    "mlp-adam-hamp": {"train": {"optimizer": "adam", "lr": 0.01, "schedule": "step"},
                      "defense": {"name": "hamp", "params": {"gamma": 0.9, "alpha": 0.01}}},
    "cnn-bn-augment": {"model": {"name": "cnn", "params": {"channels": [8, 16], "hidden": 16, "batch_norm": True}},
                       "train": {"augment": {"hflip": True, "crop": 2}, "label_smoothing": 0.1,
                                 "schedule": "onecycle"}},
    "lenet5-adamw": {"data": {"name": "synthetic", "params": {"kind": "image", "image_size": 28, "num_train": 300,
                                                              "num_test": 50}},
                     "model": {"name": "lenet5"}, "train": {"optimizer": "adamw", "lr": 0.003},
                     "queries": ["identity"]},
    # whitening stem from each model's members, frozen tensors, 64x lr on BN biases, reflect crops,
    # alternating flips, lookahead
    "airbench-whiten": {"data": {"name": "synthetic", "params": {"kind": "image", "image_size": 16, "num_train": 300,
                                                                 "num_test": 50}},
                        "model": {"name": "airbench", "params": {"widths": [4, 6], "whiten_bias_epochs": 1}},
                        "train": {"epochs": 5, "nesterov": True, "momentum": 0.85, "schedule": "triangle", "lookahead": True,
                                  "augment": {"hflip": True, "crop": 2, "pad": "reflect", "flip": "alternate"}},
                        "queries": ["identity"]},
}


@pytest.mark.parametrize("engine", ["auto", "auto-split", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_pack_matches_models_trained_alone(case, engine, monkeypatch):
    ctx = ctx_for(**CASES[case])
    models = [0, 1, 2]
    if engine == "auto-split":  # PackedSequential with every convolution run per model
        from raymia.train import packed

        monkeypatch.setattr(packed, "SPLIT_MIN_OUTPUT", 0)
    pack = train_models_packed(ctx, models, CPU, engine=engine.removesuffix("-split"))
    # every case is a sequential architecture: auto runs it as a PackedSequential, vmap as before
    assert pack.engine == ("vmap" if engine == "vmap" else "packed")
    x = ctx.audited_x
    queries = ctx.spec.queries
    gens = [torch.Generator().manual_seed(7) for _ in models]
    packed = pack_query_logits(pack, ctx.defense, x, queries, gens, CPU)
    for k, m in enumerate(models):
        alone = train_model(ctx, m, CPU)
        ref = query_logits(alone, ctx.defense, x, queries, torch.Generator().manual_seed(7))
        torch.testing.assert_close(packed[k], ref, atol=2e-5, rtol=1e-4)
        for name, buf in alone.named_buffers():
            if buf.is_floating_point():  # BatchNorm running mean / var
                torch.testing.assert_close(pack.buffers[name][k], buf, atol=2e-5, rtol=1e-4)
    # the models differ from each other (own members, own seeds)
    assert (packed[0] - packed[1]).abs().max() > 1e-2


def test_bn_running_stats_are_updated_per_model():
    ctx = ctx_for(model={"name": "cnn", "params": {"channels": [8], "hidden": 8, "batch_norm": True}})
    pack = train_models_packed(ctx, [0, 1], CPU)
    means = [n for n in pack.buffers if n.endswith("running_mean")]
    assert means
    rm = pack.buffers[means[0]]
    assert rm.abs().sum() > 0 and not torch.allclose(rm[0], rm[1])


def test_batch_stream_reshuffles_and_is_seeded():
    s = batch_stream(10, 4, torch.Generator().manual_seed(0))
    batches = [next(s) for _ in range(5)]  # 20 indices = two full permutations of 10
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    again = batch_stream(10, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(b, next(again)) for b in batches)


def test_batch_passes_number_each_permutation():
    s = batch_passes(10, 4, torch.Generator().manual_seed(0))
    pairs = [next(s) for _ in range(8)]  # 32 indices: passes 0, 1 and 2 whole, 2 of pass 3
    idx, passes = torch.cat([b for b, _ in pairs]), torch.cat([p for _, p in pairs])
    assert passes.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 2
    for p in range(3):
        assert sorted(idx[passes == p].tolist()) == list(range(10))
    assert pairs[2][1].tolist() == [0, 0, 1, 1]  # a batch that straddles two permutations
    plain = batch_stream(10, 4, torch.Generator().manual_seed(0))  # the same batches without passes
    assert all(torch.equal(b, next(plain)) for b, _ in pairs)


def test_every_model_takes_the_same_number_of_steps():
    ctx = ctx_for(plan={"population": 201})
    assert ctx.steps_per_epoch == 4  # ceil(floor(201 / 2) members / 32)
    sizes = ctx.plan.keep.sum(axis=1)
    assert sorted(set(sizes.tolist())) == [100, 101]  # a pair splits an odd population unevenly; steps do not


def test_train_pack_vectorised_equals_loop_and_is_deterministic():
    ctx = ctx_for(bank={"pack_size": 4, "vectorize": True})
    vec, _ = train_pack(ctx, 0, CPU)
    loop_ctx = ctx_for(bank={"pack_size": 4, "vectorize": False})
    loop, _ = train_pack(loop_ctx, 0, CPU)
    assert vec["logits"].shape == (4, 2, 200, 10) and vec["test_logits"].shape == (4, 2, 450, 10)
    np.testing.assert_allclose(vec["logits"], loop["logits"], atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(vec["logits"], train_pack(ctx, 0, CPU)[0]["logits"])


def test_auto_vectorize_times_both_and_picks_one(caplog):
    import logging

    from raymia.train.bank import choose_vectorize

    caplog.set_level(logging.INFO, logger="raymia")
    ctx = ctx_for(bank={"pack_size": 4})
    assert ctx.spec.bank.vectorize == "auto"
    # 3 epochs x 4 steps is too short to time: the default for a CPU is a pack for sequential models
    # (PackedSequential) and one model at a time for the others (vmap's grouped convolutions are slow there)
    assert choose_vectorize(ctx, [0, 1, 2, 3], CPU) is True
    assert "too short to time" in caplog.text
    resnet = ctx_for(bank={"pack_size": 4}, model={"name": "resnet18"})
    assert choose_vectorize(resnet, [0, 1, 2, 3], CPU) is False
    # a worker with many models to train can afford the probe
    choice = choose_vectorize(ctx, [0, 1, 2, 3], CPU, worker_models=400, probe_steps=4)
    assert isinstance(choice, bool)
    assert "per model-step: pack of 4" in caplog.text
    assert choose_vectorize(ctx, [0], CPU) is False
    assert choose_vectorize(ctx_for(bank={"vectorize": False}), [0, 1], CPU) is False
    assert choose_vectorize(ctx_for(bank={"vectorize": True}), [0, 1], CPU) is True


def test_auto_vectorize_leaves_the_usual_way_only_for_a_clear_gain():
    """The two ways train the same models to float tolerance, not bit for bit: a probe that flips with the
    machine's load would change a bank's outputs in their last digits from run to run, so the usual way
    (packs for sequential models on a CPU) stays unless the other is PROBE_MARGIN times faster."""
    from raymia.train.bank import PROBE_MARGIN, decide_vectorize, usual_vectorize

    assert PROBE_MARGIN == 1.25
    for usual in (True, False):  # seconds per model-step (pack, loop): within 1.25x the usual way stays
        for pack, loop in ((1.0, 1.0), (1.2, 1.0), (1.0, 1.2)):
            assert decide_vectorize(pack, loop, usual) is usual, (pack, loop, usual)
    assert decide_vectorize(1.0, 0.8, True) is False and decide_vectorize(0.8, 1.0, False) is True  # 1.25x
    assert decide_vectorize(1.0, 0.81, True) is True and decide_vectorize(0.81, 1.0, False) is False
    assert usual_vectorize(ctx_for(bank={"pack_size": 4}), CPU) is True
    assert usual_vectorize(ctx_for(bank={"pack_size": 4}, model={"name": "resnet18"}), CPU) is False
    assert usual_vectorize(ctx_for(bank={"pack_size": 4}, model={"name": "resnet18"}), torch.device("cuda")) is True


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_optimizer_is_the_recipes_update_rule(optimizer):
    """make_optimizer runs fused on a CPU; 20 steps on random gradients match PyTorch's per-tensor loop."""
    from raymia.spec import TrainSpec
    from raymia.train.recipe import make_optimizer

    recipe = TrainSpec(optimizer=optimizer, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    torch.manual_seed(0)
    start = [torch.randn(8, 5, 3), torch.randn(8, 5)]
    fused = [t.clone().requires_grad_(True) for t in start]
    loop = [t.clone().requires_grad_(True) for t in start]
    opt = make_optimizer(fused, recipe)
    assert opt.defaults["fused"] is True
    cls = type(opt)
    kwargs = {k: opt.defaults[k] for k in ("lr", "weight_decay") + (("momentum", "nesterov") if optimizer == "sgd" else ())}
    ref = cls(loop, foreach=False, **kwargs)
    for _ in range(20):
        grads = [torch.randn_like(t) for t in start]
        for p, q, g in zip(fused, loop, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q, s in zip(fused, loop, start):
        assert (p - s).abs().max() > 0.05  # the steps moved the parameters
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.slow
def test_compiled_pack_trains_the_same_models():
    """compile=True (torch.compile of the pack's forward and loss, a benchmark option) trains the same models."""
    ctx = ctx_for(train={"epochs": 2})
    eager = train_models_packed(ctx, [0, 1, 2, 3], CPU)
    compiled = train_models_packed(ctx, [0, 1, 2, 3], CPU, compile=True)
    start = train_models_packed(ctx, [0, 1, 2, 3], CPU, max_steps=0)
    assert compiled.engine == "packed"
    for name, p in eager.params.items():
        assert (p - start.params[name]).abs().max() > 1e-3  # trained
        torch.testing.assert_close(compiled.params[name], p, rtol=1e-4, atol=1e-5)


def dropout_mlp(params, info):
    """A builder with dropout (`model.name: tests.test_bank:dropout_mlp`)."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, info.num_classes))


def test_a_pack_with_dropout_draws_the_same_masks_whatever_the_callers_random_state():
    """README, The bank: a pack's dropout masks come from one stream that the pack's own seeds start, so the
    same pack trains the same models bit for bit (another pack size trains other ones)."""
    ctx = ctx_for(model={"name": "tests.test_bank:dropout_mlp"}, train={"epochs": 2})
    torch.manual_seed(1)
    first = train_models_packed(ctx, [0, 1], CPU)
    torch.manual_seed(2)
    again = train_models_packed(ctx, [0, 1], CPU)
    assert all(torch.equal(first.params[n], again.params[n]) for n in first.params)
    other = train_models_packed(ctx, [1], CPU)
    assert not torch.equal(other.params["4.weight"][0], first.params["4.weight"][1])
