"""CLIP weights from Hugging Face ``CLIPModel`` directories and OpenAI checkpoints -> our params.

Sizes (ViT-B/32, B/16, L/14, ...) are read from the tensors, as OpenAI's ``build_model`` does.
Nothing here executes code from a checkpoint:

* HF directory: ``config.json`` + ``model.safetensors`` read with ``safetensors.numpy``.
* OpenAI ``.pt`` (TorchScript archive such as ``ViT-B-32.pt``) and ``torch.save`` zip files
  (``.pt``/``.bin``): read by ``torch_reader`` (a restricted unpickler that only rebuilds
  tensors, each view bounds-checked against its storage, and records ``__torch__.*`` module
  objects as plain attribute dicts; any other global is refused, and memory is bounded by
  the bytes read). No torch needed. Legacy (pre-1.6, non-zip) files are checked by the same
  unpickler, then read by ``torch.load(weights_only=True)``.

The HF layout is first renamed to OpenAI's ``state_dict`` layout, so both imports go through
``convert_openai_state_dict`` and map to the same function.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from ucofia_jax.errors import CheckpointError
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models.clip import CLIP, CLIPConfig
from ucofia_jax.models.layers import ACTIVATIONS
from ucofia_jax.models.torch_reader import (  # noqa: F401 -- the .pt reader's names, re-exported
    read_torch_file,
    read_torch_shapes,
    read_torch_zip,
)

# Keys of the OpenAI JIT model that are not weights (build_model deletes the first three;
# attn_mask is a plain tensor attribute of the text blocks that our unpickler also sees).
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size|.*\.attn_mask)$")


# ---------------------------------------------------------------------------------------
# OpenAI layout
# ---------------------------------------------------------------------------------------


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"non-contiguous block indices under {prefix}: {sorted(idx)}")
    return len(idx)


def infer_openai_config(
    sd: Mapping[str, Any],
    source: str = "state dict",
    *,
    vision_heads: int = -1,
    text_heads: int | None = None,
) -> CLIPConfig:
    """CLIPConfig from an OpenAI-layout state dict (mirrors ``clip.model.build_model``).

    The tensors do not say how many heads split the width: OpenAI's rule is heads of 64
    (``vision_heads=-1``, ``text_heads=None``); a HF ``config.json`` states the counts and
    :func:`convert_hf_state_dict` passes them."""
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.c_proj.weight" in sd:
        raise CheckpointError(
            f"{source}: ResNet CLIP (visual.layer*/attnpool) is not supported; "
            "UCoFiA needs a ViT CLIP (ViT-B/32, ViT-B/16, ViT-L/14)"
        )
    for key in (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
    ):
        if key not in sd:
            raise CheckpointError(
                f"{source}: missing key {key!r} (not an OpenAI ViT CLIP state dict?)"
            )
    conv = np.shape(sd["visual.conv1.weight"])
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise CheckpointError(
            f"{source}: visual.conv1.weight has shape {conv}, expected [w, 3, p, p]"
        )
    vision_width, patch = conv[0], conv[-1]
    n_pos = np.shape(sd["visual.positional_embedding"])[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise CheckpointError(
            f"{source}: visual.positional_embedding has {n_pos} rows, not 1 + a square"
        )
    text_width = np.shape(sd["ln_final.weight"])[0]
    sizes = dict(
        embed_dim=np.shape(sd["text_projection"])[1],
        image_resolution=patch * grid,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=np.shape(sd["positional_embedding"])[0],
        vocab_size=np.shape(sd["token_embedding.weight"])[0],
        text_width=text_width,
        text_heads=max(text_width // 64, 1) if text_heads is None else text_heads,
        text_layers=_count_blocks(sd, "transformer.resblocks."),
        vision_heads=vision_heads,
    )
    if sizes["text_width"] % sizes["text_heads"]:
        raise CheckpointError(
            f"{source}: text width {text_width} is not divisible by {sizes['text_heads']} heads"
        )
    try:
        return CLIPConfig(**sizes)
    except ValueError as e:  # e.g. a vision width that the head count does not divide
        raise CheckpointError(f"{source}: {e}") from None


def _block_params(get, pre: str) -> dict:
    """One residual block: torch Linear weight [out, in] -> Flax kernel [in, out]."""

    def ln(name):
        return {"scale": get(f"{pre}{name}.weight"), "bias": get(f"{pre}{name}.bias")}

    def dense(name):
        return {"kernel": get(f"{pre}{name}.weight").T, "bias": get(f"{pre}{name}.bias")}

    return {
        "ln_1": ln("ln_1"),
        "attn": {
            "in_proj": {
                "kernel": get(f"{pre}attn.in_proj_weight").T,
                "bias": get(f"{pre}attn.in_proj_bias"),
            },
            "out_proj": dense("attn.out_proj"),
        },
        "ln_2": ln("ln_2"),
        "mlp": {"c_fc": dense("mlp.c_fc"), "c_proj": dense("mlp.c_proj")},
    }


def _expected_shapes(cfg: CLIPConfig) -> dict:
    model = CLIP(cfg)
    images = jax.ShapeDtypeStruct((1, cfg.image_resolution, cfg.image_resolution, 3), np.float32)
    ids = jax.ShapeDtypeStruct((1, 2), np.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)["params"])
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def convert_openai_state_dict(
    sd: Mapping[str, Any],
    prefix: str = "",
    strict: bool = True,
    source: str = "state dict",
    *,
    vision_heads: int = -1,
    text_heads: int | None = None,
) -> tuple[CLIPConfig, dict]:
    """OpenAI-layout ``state_dict`` (numpy-convertible values) -> (CLIPConfig, float32 params).

    ``prefix`` selects keys (e.g. ``"clip."`` in a UCoFiA checkpoint; other keys are
    ignored). With ``strict``, keys that are not CLIP weights are an error. Head counts: see
    :func:`infer_openai_config`.
    """
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source}: no keys with prefix {prefix!r}")
    cfg = infer_openai_config(sd, source, vision_heads=vision_heads, text_heads=text_heads)
    used = set()

    def get(key):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {prefix + key!r}")
        used.add(key)
        return np.asarray(sd[key], dtype=np.float32)

    conv = get("visual.conv1.weight")  # [w, 3, p, p] (torch OIHW)
    params = {
        "token_embedding": {"embedding": get("token_embedding.weight")},
        "positional_embedding": get("positional_embedding"),
        "transformer": {
            f"resblocks_{i}": _block_params(get, f"transformer.resblocks.{i}.")
            for i in range(cfg.text_layers)
        },
        "ln_final": {"scale": get("ln_final.weight"), "bias": get("ln_final.bias")},
        "text_projection": get("text_projection"),
        "logit_scale": get("logit_scale").reshape(()),
        "visual": {
            "conv1": {"kernel": conv.transpose(2, 3, 1, 0)},  # -> [p, p, 3, w] (HWIO)
            "class_embedding": get("visual.class_embedding"),
            "positional_embedding": get("visual.positional_embedding"),
            "ln_pre": {"scale": get("visual.ln_pre.weight"), "bias": get("visual.ln_pre.bias")},
            "transformer": {
                f"resblocks_{i}": _block_params(get, f"visual.transformer.resblocks.{i}.")
                for i in range(cfg.vision_layers)
            },
            "ln_post": {"scale": get("visual.ln_post.weight"), "bias": get("visual.ln_post.bias")},
            "proj": get("visual.proj"),
        },
    }
    if strict:
        extra = sorted(k for k in set(sd) - used if not _IGNORED.match(k))
        if extra:
            raise CheckpointError(
                f"{source}: unexpected keys {[prefix + k for k in extra[:10]]}"
                f"{' ...' if len(extra) > 10 else ''}"
            )
    _check_shapes(params, _expected_shapes(cfg), source)
    return cfg, params


def _check_shapes(params: dict, expected: dict, source: str, path: str = "") -> None:
    for k, want in expected.items():
        got = params.get(k)
        if isinstance(want, dict):
            _check_shapes(got, want, source, f"{path}{k}/")
        elif got is None or tuple(np.shape(got)) != want:
            raise CheckpointError(
                f"{source}: parameter {path}{k} has shape "
                f"{None if got is None else np.shape(got)}, expected {want}"
            )


# ---------------------------------------------------------------------------------------
# Hugging Face layout
# ---------------------------------------------------------------------------------------

_HF_RENAMES = [  # (HF regex, OpenAI name); weights of Linear layers are handled by the block map
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"logit_scale", "logit_scale"),
]
_HF_BLOCK = [
    (r"layer_norm1\.(weight|bias)", r"ln_1.\1"),
    (r"layer_norm2\.(weight|bias)", r"ln_2.\1"),
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.out_proj.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.c_fc.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.c_proj.\1"),
]
_HF_IGNORED = re.compile(r".*position_ids$")


def hf_to_openai_state_dict(sd: Mapping[str, Any], source: str = "state dict") -> dict:
    """Rename a HF ``CLIPModel`` state dict to OpenAI's layout (q|k|v packed, projections .T)."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, val in sd.items():
        val = np.asarray(val)
        if _HF_IGNORED.match(key):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = val.T
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = val.T
            continue
        m = re.fullmatch(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m:
            tower, i, rest = m.groups()
            pre = ("transformer" if tower == "text" else "visual.transformer") + f".resblocks.{i}."
            mq = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if mq:
                qkv.setdefault((pre, mq.group(2)), {})[mq.group(1)] = val
                continue
            for pat, rep in _HF_BLOCK:
                if re.fullmatch(pat, rest):
                    out[pre + re.sub(pat, rep, rest)] = val
                    break
            else:
                unknown.append(key)
            continue
        for pat, rep in _HF_RENAMES:
            if re.fullmatch(pat, key):
                out[re.sub(pat, rep, key)] = val
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for a HF CLIPModel: {unknown[:10]}")
    for (pre, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: block {pre} has only {sorted(parts)} of q/k/v {kind}")
        # torch MHA packs [q; k; v] along the output dimension.
        out[pre + f"attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
    return out


def convert_hf_state_dict(
    sd: Mapping[str, Any], hf_config: Mapping[str, Any], source: str = "state dict"
) -> tuple[CLIPConfig, dict]:
    """HF ``CLIPModel`` state dict + its ``config.json`` dict -> (CLIPConfig, params)."""
    tc, vc = hf_config.get("text_config") or {}, hf_config.get("vision_config") or {}
    for name, c in (("text_config", tc), ("vision_config", vc)):
        eps = c.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(
                f"{source}: {name}.layer_norm_eps={eps}; only 1e-5 is implemented"
            )
    stated = hf_stated(hf_config, source)
    activation = stated.pop("activation", "quick_gelu")
    cfg, params = convert_openai_state_dict(
        hf_to_openai_state_dict(sd, source), source=source, **stated
    )
    return dataclasses.replace(cfg, activation=activation), params


def hf_stated(hf_config: Mapping[str, Any], source: str = "config.json") -> dict:
    """What a HF ``config.json`` states that the tensors do not: ``text_heads`` and
    ``vision_heads`` (``num_attention_heads``; OpenCLIP ViT-H/14 has 16 vision heads of 80)
    and ``activation`` (``hidden_act``: quick_gelu for OpenAI's CLIPs, gelu for OpenCLIP's).
    A value it leaves out is absent: heads of 64 and quick_gelu, as every OpenAI CLIP."""
    acts = {
        name: (hf_config.get(name) or {}).get("hidden_act")
        for name in ("text_config", "vision_config")
    }
    for name, act in acts.items():
        if act is not None and act not in ACTIVATIONS:
            raise CheckpointError(
                f"{source}: {name}.hidden_act={act!r}; implemented: {sorted(ACTIVATIONS)}"
            )
    if None not in acts.values() and len(set(acts.values())) > 1:
        raise CheckpointError(
            f"{source}: text_config.hidden_act={acts['text_config']!r} but "
            f"vision_config.hidden_act={acts['vision_config']!r}; one activation is implemented "
            "for both towers"
        )
    stated = {}
    act = acts["text_config"] or acts["vision_config"]
    if act is not None:
        stated["activation"] = act
    for name, key in (("text_config", "text_heads"), ("vision_config", "vision_heads")):
        n = (hf_config.get(name) or {}).get("num_attention_heads")
        if n is None:
            continue
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CheckpointError(
                f"{source}: {name}.num_attention_heads={n!r} is not a positive integer"
            )
        stated[key] = n
    return stated


def stated_fields(path: str) -> dict:
    """What a checkpoint states beyond its tensors, read without loading weights: a HF
    directory's ``config.json`` (:func:`hf_stated`); ``{}`` for an OpenAI file, which states
    nothing (heads of 64, quick_gelu). For checking a config before anything is loaded.

    An OpenAI file is read first (its tensor table: names and shapes, views checked, no
    weight bytes) and must be an OpenAI ViT CLIP: a file that cannot be read is reported as
    such (CheckpointError), never compared with a config."""
    if not os.path.isdir(path):
        infer_openai_config(_file_shapes(path), path)
        return {}
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        return {}
    with open(cfg_path) as f:
        return hf_stated(json.load(f), cfg_path)


def _file_shapes(path: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: shape and dtype} of a weights file, read as `load_checkpoint` reads it but
    without the weights' bytes."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory (weights are never downloaded)")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "numpy") as f:
                shapes = {k: (tuple(f.get_slice(k).get_shape()), np.float32) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 -- a damaged header, named with the file
            raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None
    elif path.endswith((".pt", ".pth", ".bin")):
        shapes = read_torch_shapes(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format (expected a HF directory or "
            ".pt/.pth/.bin/.safetensors)"
        )
    if _is_hf_layout(shapes):
        raise CheckpointError(f"{path}: HF-layout weights; pass the HF directory instead")
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _is_hf_layout(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in sd)


def load_hf_dir(path: str) -> tuple[CLIPConfig, dict]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a HF CLIPModel directory)")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    archs = hf_config.get("architectures") or []
    if hf_config.get("model_type", "clip") != "clip":
        raise CheckpointError(
            f"{cfg_path}: model_type={hf_config.get('model_type')!r}, expected 'clip'"
        )
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        sd = load_file(st)
        source = st
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        source = os.path.join(path, "pytorch_model.bin")
        sd = read_torch_file(source)
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or pytorch_model.bin "
            f"(sharded checkpoints are not supported; architectures={archs})"
        )
    return convert_hf_state_dict(sd, hf_config, source=source)


def load_checkpoint(path: str) -> tuple[CLIPConfig, dict]:
    """Dispatch on a HF directory vs an OpenAI ``.pt``/``.bin``/``.safetensors`` file."""
    if os.path.isdir(path):
        return load_hf_dir(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory (weights are never downloaded)")
    if path.endswith(".safetensors"):
        sd = load_file(path)
        if _is_hf_layout(sd):
            raise CheckpointError(
                f"{path}: HF-layout weights; pass the directory that holds "
                "config.json and model.safetensors instead"
            )
    elif path.endswith((".pt", ".pth", ".bin")):
        sd = read_torch_file(path)
        if _is_hf_layout(sd):
            raise CheckpointError(f"{path}: HF-layout weights; pass the HF directory instead")
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format (expected a HF directory or "
            ".pt/.pth/.bin/.safetensors)"
        )
    return convert_openai_state_dict(sd, source=path)


def load_pretrained(path: str, **cfg_overrides) -> tuple[CLIP, dict]:
    """CLIP from a HF ``CLIPModel`` directory, or an OpenAI ``.pt`` / ``.bin`` /
    ``.safetensors`` checkpoint. Sizes come from the checkpoint; ``cfg_overrides`` may set
    the non-size fields (``token_shift_blocks``, ``token_shift_n_div``, ``dtype``) and may
    repeat size fields only if they agree with the checkpoint."""
    cfg, params = load_checkpoint(path)
    sizes = {**cfg.sizes(), "activation": cfg.activation}  # what the checkpoint fixes
    clash = {k: (v, sizes[k]) for k, v in cfg_overrides.items() if k in sizes and sizes[k] != v}
    if clash:
        raise CheckpointError(
            f"{path}: config disagrees with the checkpoint: "
            + ", ".join(
                f"config.model.clip.{k}={a!r} but the checkpoint has {b!r}"
                for k, (a, b) in clash.items()
            )
            + ". Set the checkpoint's values (configs/msrvtt_b16.py, msrvtt_l14.py show them)."
        )
    cfg = dataclasses.replace(cfg, **cfg_overrides)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return clip_lib.CLIP(cfg), params
