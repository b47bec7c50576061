"""CLIP weights from Hugging Face ``CLIPModel`` directories and OpenAI checkpoints -> our params.

Sizes (ViT-B/32, B/16, L/14, ...) are read from the tensors, as OpenAI's ``build_model`` does.
Nothing here executes code from a checkpoint:

* HF directory: ``config.json`` + ``model.safetensors`` read with ``safetensors.numpy``.
* OpenAI ``.pt`` (TorchScript archive such as ``ViT-B-32.pt``) and ``torch.save`` zip files
  (``.pt``/``.bin``): the zip's ``data.pkl`` is read by a restricted unpickler that only
  knows how to rebuild tensors (``torch._utils._rebuild_tensor_v2`` over the raw storage
  files) and records ``__torch__.*`` module objects as plain attribute dicts; any other global
  is refused. No torch needed. Legacy (pre-1.6, non-zip) files fall back to
  ``torch.load(weights_only=True)``.

The HF layout is first renamed to OpenAI's ``state_dict`` layout, so both imports go through
``convert_openai_state_dict`` and map to the same function.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models.clip import CLIP, CLIPConfig

# Keys of the OpenAI JIT model that are not weights (build_model deletes the first three;
# attn_mask is a plain tensor attribute of the text blocks that our unpickler also sees).
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size|.*\.attn_mask)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------
# OpenAI layout
# ---------------------------------------------------------------------------------------


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"non-contiguous block indices under {prefix}: {sorted(idx)}")
    return len(idx)


def infer_openai_config(sd: Mapping[str, Any], source: str = "state dict") -> CLIPConfig:
    """CLIPConfig from an OpenAI-layout state dict (mirrors ``clip.model.build_model``)."""
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
    return CLIPConfig(
        embed_dim=np.shape(sd["text_projection"])[1],
        image_resolution=patch * grid,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=np.shape(sd["positional_embedding"])[0],
        vocab_size=np.shape(sd["token_embedding.weight"])[0],
        text_width=text_width,
        text_heads=max(text_width // 64, 1),
        text_layers=_count_blocks(sd, "transformer.resblocks."),
    )


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
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)["params"]
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def convert_openai_state_dict(
    sd: Mapping[str, Any], prefix: str = "", strict: bool = True, source: str = "state dict"
) -> tuple[CLIPConfig, dict]:
    """OpenAI-layout ``state_dict`` (numpy-convertible values) -> (CLIPConfig, float32 params).

    ``prefix`` selects keys (e.g. ``"clip."`` in a UCoFiA checkpoint; other keys are
    ignored). With ``strict``, keys that are not CLIP weights are an error.
    """
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source}: no keys with prefix {prefix!r}")
    cfg = infer_openai_config(sd, source)
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
        act = c.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(
                f"{source}: {name}.hidden_act={act!r}; only OpenAI's quick_gelu is implemented"
            )
        eps = c.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(
                f"{source}: {name}.layer_norm_eps={eps}; only 1e-5 is implemented"
            )
    cfg, params = convert_openai_state_dict(hf_to_openai_state_dict(sd, source), source=source)
    text_heads = tc.get("num_attention_heads", cfg.text_heads)
    if vc.get("num_attention_heads", cfg.vision_heads) != cfg.vision_heads:
        raise CheckpointError(
            f"{source}: vision_config.num_attention_heads="
            f"{vc['num_attention_heads']} but OpenAI ViTs use width//64="
            f"{cfg.vision_heads}"
        )
    if cfg.text_width % text_heads:
        raise CheckpointError(
            f"{source}: text width {cfg.text_width} not divisible by {text_heads} heads"
        )
    return dataclasses.replace(cfg, text_heads=text_heads), params


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _TorchModuleState(dict):
    """Stand-in for a ``__torch__.*`` (TorchScript) object: just its attribute dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _np_dtype(name: str):
    dt = _STORAGE_DTYPES[name]
    if dt == "bfloat16":
        return ml_dtypes.bfloat16
    return np.dtype(dt)


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy arrays from the zip's storages; refuses every other callable."""

    def __init__(self, file, zf: zipfile.ZipFile, root: str, source: str):
        super().__init__(file)
        self._zf, self._root, self._source = zf, root, source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks: data
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda data: data  # typed lists of older TorchScript archives
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, type_str: value
        if module.startswith("__torch__"):
            return _TorchModuleState
        raise CheckpointError(
            f"{self._source}: refusing to unpickle global {module}.{name} "
            "(only tensors and module attributes are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if isinstance(storage_type, _StorageType):
            dtype = _np_dtype(storage_type.name)
        else:
            raise CheckpointError(f"{self._source}: unsupported storage type {storage_type!r}")
        if key not in self._storages:
            raw = self._zf.read(f"{self._root}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype)
        return self._storages[key]

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *unused):
        item = storage.itemsize
        if not size:
            return np.array(storage[offset])
        arr = np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
        )
        return np.array(arr)


def _flatten_tensors(obj, prefix: str = "", out: dict | None = None) -> dict:
    """TorchScript module tree / (nested) state dict -> {dotted name: array}."""
    out = {} if out is None else out
    if isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                _flatten_tensors(v, f"{prefix}{k}.", out)
    return out


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript archive or a zip-format ``torch.save`` file, without torch
    and without executing code from the file."""
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one <root>/data.pkl in the zip, found {pkls}")
        root = pkls[0].split("/")[0]
        obj = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), zf, root, path).load()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    sd = _flatten_tensors(obj)
    if not sd:
        raise CheckpointError(f"{path}: no tensors found")
    return sd


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """``.pt``/``.bin``: zip formats via ``read_torch_zip``; legacy pickles need torch."""
    if zipfile.is_zipfile(path):
        return read_torch_zip(path)
    try:
        import torch  # noqa: PLC0415 -- optional: only legacy (non-zip) files need it
    except ImportError as e:
        raise CheckpointError(
            f"{path}: legacy (non-zip) torch file; install torch to read it "
            "with torch.load(weights_only=True)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file name
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in obj.items()
        if hasattr(v, "numpy")
    }


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
    sizes = cfg.sizes()
    clash = {k: (v, sizes[k]) for k, v in cfg_overrides.items() if k in sizes and sizes[k] != v}
    if clash:
        raise ValueError(
            f"{path}: config disagrees with the checkpoint (requested, checkpoint): {clash}"
        )
    cfg = dataclasses.replace(cfg, **cfg_overrides)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return clip_lib.CLIP(cfg), params
