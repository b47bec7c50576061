"""Evaluation pieces: blockwise scoring (sharded over 4 devices) equals the one-shot
similarity; SK-norm keeps shapes and only re-ranks; the evaluator only uses the functions it
is given."""

import dataclasses

import jax
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.evaluation import evaluator as evaluate
from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as train


@pytest.mark.slow
def test_blockwise_levels_sharded_equal_one_shot():
    c = tiny_config()
    c.mesh.data = 4
    c.eval.update(dict(text_block=4, video_block=4))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
    model = tiny_model(c)
    params = train.create_train_state(model, 0)["params"]
    a = random_arrays(10, c, seed=1)
    fns = evaluate.retrieval_fns(model, mesh, c.eval)
    text = jax.device_get(model.encode_text(params, a["input_ids"]))
    video = jax.device_get(
        model.encode_video(
            params, a["frames"][:6], a["frame_mask"][:6], jax.random.PRNGKey(0), train=False
        )
    )
    blocks = fns.score(params, text, video)  # 10 x 6 in 4 x 4 blocks, padded, 4 devices
    one = np.stack(jax.device_get(model.score(params, text, video)))
    assert blocks.shape == (3, 10, 6)
    np.testing.assert_allclose(blocks, one, rtol=1e-5, atol=1e-5)

    # SK-norm with a 7-text bank: same shape; t2v adds a per-video prior (each row shifted by
    # the same vector), v2t a per-text prior.
    bank = np.random.default_rng(0).normal(size=(3, 7, 6)).astype(np.float32) * 5
    s_t2v = evaluate.sk_normalised(one, bank, "t2v", 4, "plain")
    assert s_t2v.shape == (10, 6)
    shift = s_t2v - one.mean(0)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:1], shift.shape), atol=1e-4)
    bank_v = np.random.default_rng(1).normal(size=(3, 10, 5)).astype(np.float32) * 5
    s_v2t = evaluate.sk_normalised(one, bank_v, "v2t", 4, "plain")
    shift = s_v2t - one.mean(0)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-4)


@pytest.mark.slow
def test_evaluate_uses_only_the_functions_it_is_given():
    # Per-epoch validation passes the same RetrievalFns: its jitted encoders compile once,
    # and the evaluator reaches the model through them alone.
    c = tiny_config()
    c.mesh.data = 1
    c.eval.update(dict(text_block=4, video_block=4, batch_size=4))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    params = train.create_train_state(model, 0)["params"]
    a = random_arrays(4, c, seed=2)

    class Data:
        text_to_video = np.arange(4)

        def eval_text_batches(self, global_batch):
            yield {"input_ids": a["input_ids"]}

        def eval_video_batches(self, global_batch):
            yield {"frames": a["frames"], "frame_mask": a["frame_mask"]}

    fns = evaluate.retrieval_fns(model, mesh, c.eval)
    calls = []

    def counted(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)

        return wrapped

    spy = evaluate.RetrievalFns(
        **{f.name: counted(f.name, getattr(fns, f.name)) for f in dataclasses.fields(fns)}
    )
    results = [
        evaluate.evaluate(
            spy, params, mesh, c.eval, Data(), rng=jax.random.PRNGKey(0), step=s, sk_norm=False
        )
        for s in (1, 2)
    ]
    assert [r.metrics["step"] for r in results] == [1, 2]
    assert calls == ["encode_text", "encode_video", "score"] * 2
    np.testing.assert_array_equal(results[0].similarity, results[1].similarity)
    assert fns.encode_text._cache_size() == 1 and fns.encode_video._cache_size() == 1
    # The similarity is the mean of the levels the score function returns.
    text = fns.encode_text(params, a["input_ids"])
    r_test = jax.random.split(jax.random.PRNGKey(0))[0]  # evaluate's key for the test videos
    rng = jax.random.fold_in(r_test, 0)  # of batch 0
    video = fns.encode_video(params, a["frames"], a["frame_mask"], rng)
    levels = fns.score(params, jax.device_get(text), jax.device_get(video))
    np.testing.assert_allclose(results[0].similarity, levels.mean(0), rtol=1e-6)
