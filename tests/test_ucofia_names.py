"""Head params <-> original state_dict names: round trip, fixtures, predictor versions,
shape errors, and the full-checkpoint split (clip.* incl. the attn.net. keys)."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax import weights
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
    init = lambda: head.init(jax.random.PRNGKey(0), *args, train=False, rng=jax.random.PRNGKey(0))
    return nn.unbox(jax.eval_shape(init)["params"])  # plain shapes, without the axis names


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

    def fake_convert(sd, **kwargs):
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


# ------------------------------------------------------------------ the released file

# What the original's convert_weights (module_clip.py) turns to fp16: Conv/Linear weights and
# biases, the packed MHA projections, and the two projection matrices (SPEC §3).
_FP16 = re.compile(
    r".*(attn\.(net\.)?in_proj_(weight|bias)|attn\.(net\.)?out_proj\.(weight|bias)"
    r"|mlp\.c_(fc|proj)\.(weight|bias)|conv1\.weight)$|^(visual\.proj|text_projection)$"
)


def _openai_clip_state_dict(clip) -> dict:
    """Our CLIP params -> OpenAI's state_dict names and layouts (torch Linear [out, in],
    conv OIHW), written here independently of clip_import."""
    sd = {}

    def block(pre, b):
        for ln in ("ln_1", "ln_2"):
            sd[f"{pre}{ln}.weight"], sd[f"{pre}{ln}.bias"] = b[ln]["scale"], b[ln]["bias"]
        sd[f"{pre}attn.in_proj_weight"] = b["attn"]["in_proj"]["kernel"].T
        sd[f"{pre}attn.in_proj_bias"] = b["attn"]["in_proj"]["bias"]
        for ours, theirs in (
            (("attn", "out_proj"), "attn.out_proj"),
            (("mlp", "c_fc"), "mlp.c_fc"),
            (("mlp", "c_proj"), "mlp.c_proj"),
        ):
            d = b[ours[0]][ours[1]]
            sd[f"{pre}{theirs}.weight"], sd[f"{pre}{theirs}.bias"] = d["kernel"].T, d["bias"]

    sd["token_embedding.weight"] = clip["token_embedding"]["embedding"]
    sd["positional_embedding"] = clip["positional_embedding"]
    for name, b in clip["transformer"].items():
        block(f"transformer.resblocks.{name.split('_')[1]}.", b)
    sd["ln_final.weight"], sd["ln_final.bias"] = clip["ln_final"]["scale"], clip["ln_final"]["bias"]
    sd["text_projection"] = clip["text_projection"]
    sd["logit_scale"] = clip["logit_scale"]
    v = clip["visual"]
    sd["visual.conv1.weight"] = v["conv1"]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
    sd["visual.class_embedding"] = v["class_embedding"]
    sd["visual.positional_embedding"] = v["positional_embedding"]
    for ln in ("ln_pre", "ln_post"):
        sd[f"visual.{ln}.weight"], sd[f"visual.{ln}.bias"] = v[ln]["scale"], v[ln]["bias"]
    for name, b in v["transformer"].items():
        block(f"visual.transformer.resblocks.{name.split('_')[1]}.", b)
    sd["visual.proj"] = v["proj"]
    return {k: np.asarray(x, np.float32) for k, x in sd.items()}


def _released_config():
    """The tiny model shaped like fixture case_2's head (D 64, 6 frames, 16 words, 2 seqTransf
    layers), so the head part of the file is the original code's own state dict."""
    c = tiny_config()
    c.data.update(dict(max_frames=6, max_words=16))
    c.model.head.update(dict(seq_layers=2, init_temporal_from_clip=False))
    return c


def _write_released(path, clip_params, shift_blocks):
    """A ``pytorch_model.bin`` laid out like the released one, written by torch: DDP's
    ``module.`` prefix on every key, ``clip.*`` with fp16 weights and the token-shift
    wrapper's ``attn.net.`` keys, the head (all 13 matrices incl. the 4 unused ones, the
    selector, the seqTransf blocks, frame positions) from the original code (fixture case_2)."""
    sd = {}
    for key, val in _openai_clip_state_dict(clip_params).items():
        m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.(.+)", key)
        if m and int(m.group(1)) in shift_blocks:
            key = f"visual.transformer.resblocks.{m.group(1)}.attn.net.{m.group(2)}"
        sd[f"module.clip.{key}"] = torch.from_numpy(
            np.array(val, np.float16 if _FP16.match(key) else np.float32)  # a copy, 0-d kept
        )
    for key, val in _fixture_sd().items():  # incl. clip.logit_scale of the original
        sd[f"module.{key}"] = torch.from_numpy(np.array(val))
    torch.save(sd, path)
    return sd


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    c = _released_config()
    model = tiny_model(c)
    # Random values of the model's shapes (model.init would compile the head's init: slow).
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
        jax.eval_shape(model.init, jax.random.PRNGKey(3)),
    )
    path = str(tmp_path_factory.mktemp("released") / "pytorch_model.bin")
    sd = _write_released(path, params["clip"], c.model.clip.token_shift_blocks)
    return c, model, params, path, sd


def test_released_layout_reads_without_torch_load(released, monkeypatch):
    c, model, params, path, sd = released
    # The file really has the released layout: prefix, fp16 CLIP weights, attn.net. keys.
    assert all(k.startswith("module.") for k in sd)
    assert sd["module.clip.visual.transformer.resblocks.0.attn.net.in_proj_weight"].dtype == (
        torch.float16
    )
    assert sd["module.clip.ln_final.weight"].dtype == torch.float32
    assert "module.word_mat_weight_for_pixel" in sd and "module.clip.logit_scale" in sd

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    parts = names.load_original_checkpoint(path, head_template=params["head"])

    # CLIP: exactly the fp16-rounded weights where the file holds fp16, else exact.
    def rounded(x, key):
        return np.asarray(x, np.float16).astype(np.float32) if _FP16.match(key) else x

    want = {k: rounded(v, k) for k, v in _openai_clip_state_dict(params["clip"]).items()}
    want["logit_scale"] = _fixture_sd()["clip.logit_scale"]  # the file holds the original's
    got = _openai_clip_state_dict(parts["clip_params"])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert parts["clip_config"].sizes() == model.clip_config.sizes()
    # Head: the same as the original's state dict read from memory.
    fix = _fixture_sd()
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        parts["head_params"],
        names.load_original_head_state_dict(fix, params["head"]),
    )
    assert parts["logit_scale"] == pytest.approx(float(fix["clip.logit_scale"]), rel=0, abs=0)
    assert parts["predictor"] == "new"
    assert parts["ignored"] == sorted(names.UNUSED_ORIGINAL_KEYS)  # and nothing else


def test_released_checkpoint_evaluates(released):
    """The weights door's released-checkpoint source (what --mode=eval and search load), then
    the evaluation path through the one door (encode_text, encode_video, score): same scores
    as the same weights assembled in memory."""
    c, model, params, path, _ = released
    c = c.copy_and_resolve_references()
    c.model.ucofia_checkpoint = path
    door = weights.load(c)
    assert door.model == model and door.step == 0
    loaded = door.params
    head = names.load_original_head_state_dict(_fixture_sd(), params["head"])
    clip = names.load_original_checkpoint(path)["clip_params"]
    by_hand = {"clip": clip, "head": head}
    batch = random_arrays(3, c)
    rng = jax.random.PRNGKey(0)

    @jax.jit
    def jitted(p):
        text = model.encode_text(p, jnp.asarray(batch["input_ids"]))
        video = model.encode_video(p, jnp.asarray(batch["frames"]), batch["frame_mask"], rng)
        return model.score(p, text, video).mean()

    def scores(p):
        return np.asarray(jitted(jax.tree_util.tree_map(jnp.asarray, dict(p))))

    got, want = scores(loaded), scores(by_hand)
    assert got.shape == (3, 3) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The loaded weights are used: the random init of `params` scores differently.
    assert not np.allclose(scores(params), got, atol=1e-3)


def test_released_checkpoint_without_torch(released, tmp_path):
    """A process where ``import torch`` fails reads the file to the same arrays."""
    _, _, params, path, _ = released
    out = str(tmp_path / "parts.npz")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch -> ImportError\n"
        "import jax, numpy as np\n"
        "from ucofia_jax.models import ucofia_names\n"
        "parts = ucofia_names.load_original_checkpoint(sys.argv[1])\n"
        "flat = {jax.tree_util.keystr(p): np.asarray(v) for part in ('clip_params', "
        "'head_params') for p, v in jax.tree_util.tree_leaves_with_path({part: parts[part]})}\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "np.savez(sys.argv[2], **flat)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", code, path, out],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    parts = names.load_original_checkpoint(path)
    here = {
        jax.tree_util.keystr(p): np.asarray(v)
        for part in ("clip_params", "head_params")
        for p, v in jax.tree_util.tree_leaves_with_path({part: parts[part]})
    }
    with np.load(out) as z:
        assert set(z.files) == set(here)
        for k in here:
            np.testing.assert_array_equal(z[k], here[k], err_msg=k)
