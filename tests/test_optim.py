"""Our BertAdam chain vs a hand-written NumPy statement of the original update
(CLIP4Clip optimization.py:52-167 + main_ucofia.py:188-206, 278, 287-290)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.config import base_config
from ucofia_jax.runtime import sharding
from ucofia_jax.training import optim
from ucofia_jax.training import trainer as trainer_lib

TOL = dict(rtol=1e-5, atol=1e-7)
LOGIT_MAX = math.log(100)
EMBEDDING = "['clip']['token_embedding']['embedding']"


def _train(**overrides):
    """``config.train`` (the defaults, the original recipe, live only in the config schema)."""
    train = base_config().train
    train.update(overrides)
    return train


def _optimizer(total_steps=10, **overrides):
    """The optimizer and its schedules as the trainer builds them, from ``config.train``."""
    train = _train(**overrides)
    schedules = optim.group_schedules(train, total_steps)
    return optim.make_optimizer(train, schedules), schedules


def _run(tx, params, grads_seq):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optim.clamp_logit_scale(optax.apply_updates(p, updates))
    return p


def _params(rng):
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "clip": {
            "token_embedding": {"embedding": r(10, 4)},
            "transformer": {"kernel": r(4, 4), "bias": r(4)},
            "ln_final": {"scale": r(4), "bias": r(4)},
            "logit_scale": np.float32(math.log(100.0) - 1e-4),
        },
        "head": {
            "global_mat_weight": np.eye(4, dtype=np.float32) + r(4, 4) * 0.1,
            "dense": {"kernel": r(4, 3), "bias": r(3)},
        },
    }


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _reference_bertadam(
    params,
    grads_seq,
    *,
    total,
    lr,
    clip_lr,
    warmup,
    wd,
    frozen_keys,
    b1=0.9,
    b2=0.98,
    e=1e-6,
    max_grad_norm=1.0,
    logit_max=LOGIT_MAX,
):
    """The original, literally: torch clip_grad_norm_ semantics, BertAdam loop, clamp."""
    p = {k: v.astype(np.float64).copy() for k, v in _flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v_ = {k: np.zeros_like(v) for k, v in p.items()}
    step = 0
    for grads in grads_seq:
        g = {k: np.asarray(x, np.float64) for k, x in _flat(grads).items() if k not in frozen_keys}
        # main_ucofia.py:278 clip_grad_norm_(model.parameters(), 1.0): params with grads only.
        total_norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        coef = min(1.0, 1.0 / (total_norm + 1e-6))
        g = {k: x * coef for k, x in g.items()}
        x_prog = step / total
        sched = x_prog / warmup if x_prog < warmup else 0.5 * (1.0 + math.cos(math.pi * x_prog))
        for k, gk in g.items():
            n = math.sqrt(float(np.sum(gk * gk)))  # per-tensor clip
            gk = gk * min(1.0, max_grad_norm / (n + 1e-6))
            m[k] = b1 * m[k] + (1 - b1) * gk
            v_[k] = b2 * v_[k] + (1 - b2) * gk * gk
            update = m[k] / (np.sqrt(v_[k]) + e)
            if "bias" not in k:  # decay group
                update = update + wd * p[k]
            group_lr = clip_lr if k.startswith("['clip']") else lr
            p[k] = p[k] - group_lr * sched * update
        step += 1
        key = "['clip']['logit_scale']"
        p[key] = np.minimum(p[key], logit_max)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [1, 3])
def test_bertadam_matches_original(num_steps):
    rng = np.random.default_rng(0)
    params = _params(rng)
    # Big gradients so that both the global and the per-tensor clip are active; one small
    # tensor below the per-tensor threshold after the global clip.
    grads_seq = []
    for _ in range(num_steps):
        g = jax.tree.map(lambda x: (rng.normal(size=np.shape(x)) * 3.0).astype(np.float32), params)
        g["head"]["dense"]["bias"] = (g["head"]["dense"]["bias"] * 1e-3).astype(np.float32)
        grads_seq.append(g)
    total, warmup = 10, 0.1
    tx, _ = _optimizer(
        total,
        optimizer="bertadam",
        schedule="warmup_cosine",
        lr=1e-1,
        clip_lr=1e-2,
        warmup_proportion=warmup,
        weight_decay=0.2,
        frozen=("token_embedding",),
    )
    p = _run(tx, params, grads_seq)
    ref = _reference_bertadam(
        params,
        grads_seq,
        total=total,
        lr=1e-1,
        clip_lr=1e-2,
        warmup=warmup,
        wd=0.2,
        frozen_keys={EMBEDDING},
    )
    ours = _flat(p)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], err_msg=k, **TOL)
    # Frozen embedding bit-identical; step 0 has lr 0 so one step changes nothing.
    np.testing.assert_array_equal(ours[EMBEDDING], params["clip"]["token_embedding"]["embedding"])
    if num_steps == 1:
        for k in ref:
            np.testing.assert_array_equal(ours[k], _flat(params)[k])


def test_schedule_shape():
    s = optim.make_schedule(1.0, 100, 0.1, "warmup_cosine")
    np.testing.assert_allclose(float(s(0)), 0.0)
    np.testing.assert_allclose(float(s(5)), 0.5)
    # Jumps from ~1 to 0.5(1+cos(0.1 pi)) = 0.976 at x = 0.1: the cosine spans the whole run.
    np.testing.assert_allclose(float(s(10)), 0.5 * (1 + math.cos(0.1 * math.pi)), rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 0.0, atol=1e-7)


def test_labels_and_decay_mask():
    params = _params(np.random.default_rng(1))
    labels = _flat(optim.param_labels(params, ("token_embedding",)))
    assert labels["['clip']['token_embedding']['embedding']"] == "frozen"
    assert labels["['clip']['transformer']['kernel']"] == "clip"
    assert labels["['head']['dense']['kernel']"] == "head"
    mask = _flat(optim.decay_mask(params))
    assert mask["['clip']['ln_final']['scale']"] and mask["['head']['global_mat_weight']"]
    assert not mask["['clip']['transformer']['bias']"]


def test_group_schedules_follow_the_config():
    train = _train(lr=1e-1, clip_lr=1e-3, warmup_proportion=0.1, schedule="warmup_cosine")
    schedules = optim.group_schedules(train, 100)
    assert set(schedules) == {"clip", "head"}
    for group, base_lr in (("clip", 1e-3), ("head", 1e-1)):
        np.testing.assert_allclose(float(schedules[group](5)), 0.5 * base_lr, rtol=1e-6)


def _grads(params, rng, scale=3.0):
    return jax.tree.map(lambda x: (rng.normal(size=np.shape(x)) * scale).astype(np.float32), params)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_group_gets_its_own_lr(name):
    """The same tensor, gradient and value in the CLIP group and in the head: the updates
    differ by exactly clip_lr / lr (1 if the CLIP group got the head's lr)."""
    rng = np.random.default_rng(3)
    x, g = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    params = {"clip": {"w": x}, "head": {"w": x}}
    grads = {"clip": {"w": g}, "head": {"w": g}}
    lr, clip_lr = 1e-1, 1e-3
    tx, _ = _optimizer(
        optimizer=name, schedule="constant", lr=lr, clip_lr=clip_lr, grad_clip=0.0, frozen=()
    )
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        ratio = np.asarray(updates["clip"]["w"]) / np.asarray(updates["head"]["w"])
        np.testing.assert_allclose(ratio, clip_lr / lr, rtol=1e-5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_params_never_change_nor_count_in_the_clip(name):
    """Frozen params (config.train.frozen) stay bit-identical over steps with an lr > 0, and
    their gradients do not count in the global clipping norm (torch: they have none)."""
    rng = np.random.default_rng(4)
    params = _params(rng)
    grads_seq = [_grads(params, rng) for _ in range(3)]
    tx, _ = _optimizer(
        optimizer=name, schedule="constant", lr=1e-1, clip_lr=1e-2, frozen=("token_embedding",)
    )
    p = _flat(_run(tx, params, grads_seq))
    start = _flat(params)
    np.testing.assert_array_equal(p[EMBEDDING], start[EMBEDDING])
    assert all(not np.array_equal(p[k], start[k]) for k in start if k != EMBEDDING)
    # Huge frozen gradients would shrink every other update if they counted in the norm.
    for g in grads_seq:
        g["clip"]["token_embedding"]["embedding"] *= 1e6
    again = _flat(_run(tx, params, grads_seq))
    for k in p:
        np.testing.assert_array_equal(again[k], p[k], err_msg=k)


def test_adamw_alternative_runs():
    params = jax.tree.map(jnp.asarray, _params(np.random.default_rng(2)))
    tx, _ = _optimizer(optimizer="adamw", lr=1e-2, clip_lr=1e-3, frozen=("token_embedding",))
    p = _run(tx, params, [jax.tree.map(jnp.ones_like, params)] * 3)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))


@pytest.mark.slow
def test_trainer_logs_each_groups_lr():
    """metrics['lr'] / ['clip_lr'] are the head's and CLIP's schedules at the step taken."""
    c = tiny_config()
    c.mesh.data = 1
    c.train.update(dict(lr=1e-2, clip_lr=1e-3, schedule="warmup_cosine", warmup_proportion=0.5))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    state = trainer_lib.create_train_state(model, 0)
    trainer = trainer_lib.make_trainer(
        model, c.train, mesh, state, schedule_total=4, axis_rules=c.mesh.logical_axis_rules
    )
    schedules = optim.group_schedules(c.train, 4)
    state = trainer_lib.place_state(trainer, state)
    batch = sharding.shard_batch(trainer_lib.model_inputs(random_arrays(8, c)), mesh)
    for step in range(2):
        state, metrics = trainer.train_step(state, batch)
        assert float(metrics["lr"]) == float(schedules["head"](step))
        assert float(metrics["clip_lr"]) == float(schedules["clip"](step))
    np.testing.assert_allclose([metrics["lr"], metrics["clip_lr"]], [0.5e-2, 0.5e-3], rtol=1e-6)
