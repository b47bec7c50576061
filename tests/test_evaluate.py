"""Evaluation pieces: the blockwise levels (sharded over 4 devices) equal the one-shot
similarity and the host block loop; SK-norm keeps shapes and only re-ranks."""

import jax
import numpy as np
from _tiny import random_arrays, tiny_config

from ucofia_jax import evaluate, sharding, train
from ucofia_jax.models.retrieval import RetrievalModel


def test_blockwise_levels_sharded_equal_one_shot():
    c = tiny_config()
    c.mesh.data = 4
    c.eval.update(dict(text_block=4, video_block=4))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
    model = RetrievalModel.from_config(c)
    params = train.create_train_state(model, c, 0)["params"]
    a = random_arrays(10, c, seed=1)
    enc = evaluate.Encoder(model, mesh, c.eval)
    text = jax.device_get(model.encode_text(params, a["input_ids"]))
    video = jax.device_get(
        model.encode_video(
            params, a["frames"][:6], a["frame_mask"][:6], jax.random.PRNGKey(0), train=False
        )
    )
    blocks = enc.levels(params, text, video)  # 10 x 6 in 4 x 4 blocks, padded
    loop = enc.levels_loop(params, text, video)
    one = np.stack(jax.device_get(model.similarity_levels(params, text, video, train=False)))
    assert blocks.shape == (3, 10, 6)
    np.testing.assert_allclose(blocks, one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loop, one, rtol=1e-5, atol=1e-5)

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


def test_evaluate_reuses_a_given_encoder(monkeypatch):
    # Evaluation after every epoch passes one Encoder: its jitted encoders compile once.
    import pytest

    c = tiny_config()
    c.mesh.data = 1
    c.eval.update(dict(text_block=4, video_block=4, batch_size=4))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = RetrievalModel.from_config(c)
    params = train.create_train_state(model, c, 0)["params"]
    a = random_arrays(4, c, seed=2)

    class Data:
        text_to_video = np.arange(4)

        def eval_text_batches(self, global_batch):
            yield {"input_ids": a["input_ids"]}

        def eval_video_batches(self, global_batch):
            yield {"frames": a["frames"], "frame_mask": a["frame_mask"]}

    enc = evaluate.Encoder(model, mesh, c.eval)
    monkeypatch.setattr(evaluate, "Encoder", lambda *_, **__: pytest.fail("a new Encoder"))
    results = [
        evaluate.evaluate(
            model,
            params,
            mesh,
            c,
            Data(),
            rng=jax.random.PRNGKey(0),
            step=s,
            sk_norm=False,
            encoder=enc,
        )
        for s in (1, 2)
    ]
    assert [r["step"] for r in results] == [1, 2]
    np.testing.assert_array_equal(results[0]["_similarity"], results[1]["_similarity"])
    assert enc._text._cache_size() == 1 and enc._video._cache_size() == 1
