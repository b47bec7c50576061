"""Head params <-> original state_dict names: round trip, fixtures, predictor versions,
shape errors, and the full-checkpoint split (clip.* incl. the attn.net. keys)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucofia_jax.models import ucofia_names as names
from ucofia_jax.models.head import UCoFiAHead, init_temporal_from_clip

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ucofia_reference", "case_2.npz")


def _template(head, n_tok=17):
    d, f, w = head.embed_dim, head.max_frames, head.max_words
    args = (
        jnp.zeros((1, d)),
        jnp.zeros((1, w, d)),
        jnp.zeros((1, f, d)),
        jnp.zeros((1, f * n_tok, d)),
        jnp.ones((1, f)),
        0.0,
    )
    return jax.eval_shape(
        lambda: head.init(jax.random.PRNGKey(0), *args, train=False, rng=jax.random.PRNGKey(0))
    )["params"]


def _fixture_sd(prefix="param."):
    z = np.load(FIX)
    return {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}


def test_fixture_loads_and_round_trips():
    head = UCoFiAHead(embed_dim=64, max_frames=6, max_words=16, seq_layers=2)
    sd = _fixture_sd()
    params = names.load_original_head_state_dict(sd, _template(head))
    assert params["temporal"]["resblocks_1"]["attn"]["in_proj"]["kernel"].shape == (64, 192)
    back = names.head_params_to_state_dict(params)
    for k, v in back.items():
        if k in names.UNUSED_ORIGINAL_KEYS:
            assert np.array_equal(v, np.eye(v.shape[0]))
        else:
            np.testing.assert_array_equal(v, sd[k])
    head_keys = {k for k in sd if names.is_head_key(k)}
    assert head_keys == set(back) - set(names.UNUSED_ORIGINAL_KEYS)
    assert names.detect_predictor(sd) == "new"


def test_old_predictor_shapes_and_hint():
    sd = _fixture_sd()
    z = np.load(FIX)
    sd.update({k[len("param_evalt2v.") :]: z[k] for k in z.files if k.startswith("param_evalt2v.")})
    assert names.detect_predictor(sd) == "old"
    old = UCoFiAHead(embed_dim=64, max_frames=6, max_words=16, seq_layers=2, predictor="old")
    p = names.load_original_head_state_dict(sd, _template(old))
    assert p["selector"]["in_proj"]["kernel"].shape == (128, 64)
    new = UCoFiAHead(embed_dim=64, max_frames=6, max_words=16, seq_layers=2)
    with pytest.raises(ValueError, match="'old' predictor"):
        names.load_original_head_state_dict(sd, _template(new))


def test_frame_count_mismatch_names_parameter_and_shapes():
    head = UCoFiAHead(embed_dim=64, max_frames=8, max_words=16, seq_layers=2)
    with pytest.raises(ValueError, match=r"frame_logit_weight.*\(6, 6\).*\(8, 8\)"):
        names.load_original_head_state_dict(_fixture_sd(), _template(head))


def test_fresh_head_round_trip_and_clip_init():
    head = UCoFiAHead(embed_dim=64, max_frames=4, max_words=8, seq_layers=2)
    params = jax.tree_util.tree_map(
        lambda s: np.random.RandomState(0).randn(*s.shape).astype(np.float32), _template(head, 5)
    )
    back = names.load_original_head_state_dict(
        names.head_params_to_state_dict(params), _template(head, 5)
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    clip = {
        "transformer": {
            f"resblocks_{i}": jax.tree_util.tree_map(
                lambda x, i=i: x + i + 1.0, params["temporal"]["resblocks_0"]
            )
            for i in range(3)
        },
        "positional_embedding": np.ones((77, 64), np.float32),
    }
    new = init_temporal_from_clip(params, clip)
    np.testing.assert_array_equal(
        new["temporal"]["resblocks_1"]["ln_1"]["scale"],
        clip["transformer"]["resblocks_1"]["ln_1"]["scale"],
    )
    assert float(new["frame_position_embeddings"].sum()) == 77 * 64
    clip["positional_embedding"] = np.ones((40, 64), np.float32)
    with pytest.raises(ValueError, match="positional_embedding"):
        init_temporal_from_clip(params, clip)


def test_full_checkpoint_split(monkeypatch):
    seen = {}

    def fake_convert(sd):
        seen.update(sd)
        return "cfg", {"ok": True}

    # ucofia_names imports the converter by name: patch the name it calls.
    monkeypatch.setattr(names, "convert_openai_state_dict", fake_convert)
    sd = _fixture_sd()
    sd["clip.logit_scale"] = np.float32(4.6)
    sd["clip.visual.transformer.resblocks.10.attn.net.in_proj_weight"] = np.zeros((3, 1))
    sd["clip.visual.transformer.resblocks.9.attn.in_proj_weight"] = np.zeros((3, 1))
    sd["module.clip.token_embedding.weight"] = np.zeros((2, 2))  # DDP prefix stripped
    out = names.load_original_checkpoint(sd)
    assert "visual.transformer.resblocks.10.attn.in_proj_weight" in seen
    assert "token_embedding.weight" in seen and not any(".net." in k for k in seen)
    assert out["clip_params"] == {"ok": True} and abs(out["logit_scale"] - 4.6) < 1e-6
    assert out["predictor"] == "new" and "frame_logit_weight" in out["head_params"]
