"""Weight import: HF directory, OpenAI-layout files (torch.save zip, TorchScript archive,
safetensors) and the errors a user can meet. All checkpoints are written by the tests."""

import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
from clip_testutil import TINY, hf_outputs, inputs, random_hf_clip, state_dict_numpy
from safetensors.numpy import save_file

from configs import msrvtt
from ucofia_jax import preflight
from ucofia_jax.errors import CheckpointError, ConfigError
from ucofia_jax.models import clip_import, torch_reader


def openai_layout(model) -> dict:
    """The HF model's weights under OpenAI's state_dict names, written out independently of
    clip_import (torch tensors, OpenAI shapes: Linear [out, in], in_proj packed q|k|v)."""
    sd = model.state_dict()
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
    }
    for hf, oa, n in (
        ("text_model", "transformer", TINY["text_layers"]),
        ("vision_model", "visual.transformer", TINY["vision_layers"]),
    ):
        for i in range(n):
            h, o = f"{hf}.encoder.layers.{i}.", f"{oa}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat(
                    [sd[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"], 0
                )
                out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
                out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
                out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
                out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def shapes_only_openai_file(path, clip) -> str:
    """A ``torch.save`` file in OpenAI layout with the shapes of the sizes in ``clip`` (a
    ``config.model.clip``) and every tensor an expanded view of one stored zero: a
    readable CLIP checkpoint of any size in a few kB (its weights are all zero)."""
    v, t, grid = clip.vision_width, clip.text_width, clip.image_resolution // clip.vision_patch_size
    shapes = {
        "visual.conv1.weight": (v, 3, clip.vision_patch_size, clip.vision_patch_size),
        "visual.positional_embedding": (grid * grid + 1, v),
        "visual.proj": (v, clip.embed_dim),
        "text_projection": (t, clip.embed_dim),
        "positional_embedding": (clip.context_length, t),
        "token_embedding.weight": (clip.vocab_size, t),
        "ln_final.weight": (t,),
    }
    for i in range(clip.vision_layers):
        shapes[f"visual.transformer.resblocks.{i}.ln_1.weight"] = (v,)
    for i in range(clip.text_layers):
        shapes[f"transformer.resblocks.{i}.ln_1.weight"] = (t,)
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, str(path))
    return str(path)


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(sd: dict, path: str) -> None:
    """A TorchScript archive holding ``sd`` as a module tree, like OpenAI's ``ViT-B-32.pt``
    (fp16 weights, plus the non-weight attributes the JIT model carries)."""
    root = _Holder()
    for key, val in sd.items():
        *mods, leaf = key.split(".")
        m = root
        for name in mods:
            if not hasattr(m, name):
                m.add_module(name, _Holder())
            m = getattr(m, name)
        m.register_parameter(leaf, torch.nn.Parameter(val.half(), requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(TINY["image_resolution"]))
    root.transformer.resblocks.get_submodule("0").attn_mask = torch.zeros(4, 4)
    torch.jit.script(root).save(path)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_clip(TINY, seed=3)


@pytest.fixture(scope="module")
def hf_import(hf_model):
    return clip_import.convert_hf_state_dict(state_dict_numpy(hf_model), hf_model.config.to_dict())


def _assert_same_params(a, b, atol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(p)
        )


@pytest.mark.slow
def test_hf_directory(tmp_path, hf_model, hf_import):
    hf_model.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    model, params = clip_import.load_pretrained(str(tmp_path), token_shift_blocks=(1,))
    assert model.cfg.sizes() == TINY and model.cfg.token_shift_blocks == (1,)
    _assert_same_params(params, hf_import[1])
    images, ids = inputs(TINY, 2, 10, seed=5)
    ref = hf_outputs(hf_model, images, ids)
    img = model.apply({"params": params}, images, method=model.encode_image)
    txt = model.apply({"params": params}, ids.astype(np.int32), method=model.encode_text)
    for got, r in ((img, ref[0]), (txt, ref[1])):
        assert np.max(np.abs(np.asarray(got) - r)) <= 1e-4 * np.max(np.abs(r))


def test_openai_torch_save(tmp_path, hf_model, hf_import):
    path = str(tmp_path / "openai.pt")
    torch.save(openai_layout(hf_model), path)
    model, params = clip_import.load_pretrained(path)
    assert model.cfg == hf_import[0]
    _assert_same_params(params, hf_import[1])


def test_openai_safetensors_and_prefix(tmp_path, hf_model, hf_import):
    sd = {k: v.numpy() for k, v in openai_layout(hf_model).items()}
    save_file(sd, str(tmp_path / "openai.safetensors"))
    _, params = clip_import.load_pretrained(str(tmp_path / "openai.safetensors"))
    _assert_same_params(params, hf_import[1])
    # A UCoFiA checkpoint keeps CLIP under "clip."; other keys are not CLIP's business.
    ucofia = {**{f"clip.{k}": v for k, v in sd.items()}, "global_mat_weight": np.eye(4)}
    cfg, params = clip_import.convert_openai_state_dict(ucofia, prefix="clip.")
    _assert_same_params(params, hf_import[1])


def test_openai_torchscript_archive(tmp_path, hf_model, hf_import):
    path = str(tmp_path / "ViT-tiny.pt")
    torchscript_archive(openai_layout(hf_model), path)
    with zipfile.ZipFile(path) as zf:  # it really is a TorchScript archive
        assert any("/code/__torch__" in n for n in zf.namelist())
    cfg, params = clip_import.load_checkpoint(path)
    assert cfg == hf_import[0]
    # The archive stores fp16, as OpenAI's: equal to the fp16-rounded float32 weights.
    rounded = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float16).astype(np.float32), hf_import[1]
    )
    _assert_same_params(params, rounded)
    # The conversion recipe of docs/clip.md: TorchScript -> safetensors (OpenAI layout).
    save_file(clip_import.read_torch_file(path), str(tmp_path / "ViT-tiny.safetensors"))
    _, params2 = clip_import.load_pretrained(str(tmp_path / "ViT-tiny.safetensors"))
    _assert_same_params(params2, rounded)


def test_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to unpickle global"):
        clip_import.load_checkpoint(path)


def _sd(hf_model):
    return {k: v.numpy() for k, v in openai_layout(hf_model).items()}


def test_errors(tmp_path, hf_model):
    sd = _sd(hf_model)

    def write(d, name="bad.safetensors"):
        p = str(tmp_path / name)
        save_file(d, p)
        return p

    p = write({k: v for k, v in sd.items() if k != "visual.ln_post.bias"})
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors.*missing key 'visual\.ln_post\.bias'"
    ):
        clip_import.load_pretrained(p)
    p = write({**sd, "ln_final.bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*ln_final/bias has shape \(7,\)"):
        clip_import.load_pretrained(p)
    p = write({**sd, "visual.layer1.0.conv1.weight": np.zeros((2, 2, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="ResNet CLIP"):
        clip_import.load_pretrained(p)
    p = write({**sd, "visual.extra": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['visual\.extra'\]"):
        clip_import.load_pretrained(p)
    with pytest.raises(CheckpointError, match="no such file"):
        clip_import.load_pretrained(str(tmp_path / "nope.pt"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        clip_import.load_pretrained(str(tmp_path / "w.npz"))
    p = write(sd, "ok.safetensors")
    with pytest.raises(ValueError, match="disagrees with the checkpoint"):
        clip_import.load_pretrained(p, vision_width=64)
    # HF directory with an activation we do not implement.
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        clip_import.load_pretrained(str(d))
    with pytest.raises(CheckpointError, match="no config.json"):
        clip_import.load_pretrained(str(tmp_path))


def test_model_init_refuses_a_checkpoint_of_other_sizes(hf_model, tmp_path):
    """Model.init compares every size of config.model.clip with the checkpoint's before it
    loads a weight: a width that differs is named, not left to a shape error in the head."""
    from configs import demo  # noqa: PLC0415
    from ucofia_jax.models.model import Model  # noqa: PLC0415

    hf_model.save_pretrained(tmp_path / "hf")
    c = demo.get_config()
    c.model.clip.update(dict(TINY, checkpoint=str(tmp_path / "hf"), from_scratch=False))
    c.model.clip.token_shift_blocks = (1,)
    model = Model.from_config(c.model, max_frames=2, max_words=8)
    params = model.init(jax.random.PRNGKey(0))  # sizes agree: loads
    assert params["clip"]["visual"]["conv1"]["kernel"].shape[-1] == TINY["vision_width"]
    c.model.clip.vision_width = 64
    model = Model.from_config(c.model, max_frames=2, max_words=8)
    with pytest.raises(
        CheckpointError, match=r"config\.model\.clip\.vision_width=64 but the checkpoint has 128"
    ):
        model.init(jax.random.PRNGKey(0))


def test_a_clip_file_is_read_before_the_config_is_compared_with_it(tmp_path):
    """preflight compares head counts with the checkpoint only after reading it: a file that
    cannot be read is named as such, not said to differ from the config."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    c = msrvtt.get_config()  # ViT-B/32 sizes: 12 heads of 64
    c.model.clip.vision_heads = 16  # a config the heads check refuses for a readable file
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    zipped = str(tmp_path / "zipped.pt")
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    not_clip = str(tmp_path / "not_clip.pt")
    torch.save({"w": torch.ones(3)}, not_clip)
    cases = {
        str(empty): "unreadable legacy torch file",
        str(plain): f"refusing to unpickle global {os.system.__module__}.system",
        zipped: f"refusing to unpickle global {os.system.__module__}.system",
        not_clip: "missing key 'visual.conv1.weight'",
    }
    for path, problem in cases.items():
        c.model.clip.checkpoint = path
        with pytest.raises(CheckpointError) as info:
            preflight.check_inputs(c, "train", str(tmp_path))
        msg = str(info.value)
        assert msg.startswith(path) and problem in msg and "\n" not in msg, msg
        assert "differ from the checkpoint" not in msg and "weights_only" not in msg, msg
    # A readable ViT-B/32-shaped file (no weight byte is read): now the heads are compared.
    c.model.clip.checkpoint = shapes_only_openai_file(tmp_path / "ViT-B-32.pt", c.model.clip)
    assert os.path.getsize(c.model.clip.checkpoint) < 20_000
    with pytest.raises(ConfigError, match=r"differ from the checkpoint .*vision_heads=12"):
        preflight.check_inputs(c, "train", str(tmp_path))
    shapes = torch_reader.read_torch_shapes(c.model.clip.checkpoint)
    assert shapes["token_embedding.weight"] == ((49408, 512), np.float32)
