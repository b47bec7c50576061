"""Head parameter names <-> the original UCoFiA ``state_dict`` names (SPEC §16.10).

Our tree (``UCoFiAHead``)                         original key
``selector/in_norm/{scale,bias}``                 ``visual_token_selector.score_predictor.in_conv.0.{weight,bias}``
``selector/in_proj/kernel``        (transposed)   ``...score_predictor.in_conv.1.weight``
``selector/out_fc1/kernel``        (transposed)   ``...score_predictor.out_conv.0.weight``
``selector/out_fc2/kernel``        (transposed)   ``...score_predictor.out_conv.2.weight``
``frame_position_embeddings``                     ``frame_position_embeddings.weight``
``temporal/resblocks_{i}/...``                    ``transformerClip.resblocks.{i}...`` (CLIP block names)
``global_mat_weight`` ... ``pixel_mat_weight2``   same names, same layout (used as ``x @ W``)

The old and new predictors share the names and differ in shapes ([2D] vs [D] LayerNorm, ...);
``detect_predictor`` tells them apart. Four matrices of the original are never used
(``UNUSED_ORIGINAL_KEYS``); they are skipped on import and written as identities on export.
``clip.*`` keys of a full checkpoint go to ``clip_import.convert_openai_state_dict`` after the
``attn.net.`` keys of the token-shifted visual blocks are mapped back (§12.3).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ucofia_jax.errors import CheckpointError
from ucofia_jax.models.clip_import import convert_openai_state_dict
from ucofia_jax.models.torch_reader import read_torch_file

SELECTOR_PREFIX = "visual_token_selector.score_predictor."
TEMPORAL_PREFIX = "transformerClip.resblocks."
MATRICES = (
    "global_mat_weight",
    "global_mat_weight_1",
    "local_mat_weight",
    "local_mat_weight1",
    "frame_logit_weight",
    "word_mat_weight",
    "word_mat_weight2",
    "pixel_mat_weight",
    "pixel_mat_weight2",
)
UNUSED_ORIGINAL_KEYS = (
    "word_logit_weight",
    "frame_mat_weight",
    "frame_mat_weight2",
    "word_mat_weight_for_pixel",
)
_SELECTOR = {  # ours -> (original suffix, transpose)
    ("in_norm", "scale"): ("in_conv.0.weight", False),
    ("in_norm", "bias"): ("in_conv.0.bias", False),
    ("in_proj", "kernel"): ("in_conv.1.weight", True),
    ("out_fc1", "kernel"): ("out_conv.0.weight", True),
    ("out_fc2", "kernel"): ("out_conv.2.weight", True),
}
_BLOCK = {  # ours (inside resblocks_i) -> (original suffix, transpose)
    ("ln_1", "scale"): ("ln_1.weight", False),
    ("ln_1", "bias"): ("ln_1.bias", False),
    ("attn", "in_proj", "kernel"): ("attn.in_proj_weight", True),
    ("attn", "in_proj", "bias"): ("attn.in_proj_bias", False),
    ("attn", "out_proj", "kernel"): ("attn.out_proj.weight", True),
    ("attn", "out_proj", "bias"): ("attn.out_proj.bias", False),
    ("ln_2", "scale"): ("ln_2.weight", False),
    ("ln_2", "bias"): ("ln_2.bias", False),
    ("mlp", "c_fc", "kernel"): ("mlp.c_fc.weight", True),
    ("mlp", "c_fc", "bias"): ("mlp.c_fc.bias", False),
    ("mlp", "c_proj", "kernel"): ("mlp.c_proj.weight", True),
    ("mlp", "c_proj", "bias"): ("mlp.c_proj.bias", False),
}


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if hasattr(v, "items"):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def original_name(path: Tuple[str, ...]) -> Tuple[str, bool]:
    """Our param path -> (original state_dict key, transposed?)."""
    if path[0] == "selector":
        suffix, t = _SELECTOR[tuple(path[1:])]
        return SELECTOR_PREFIX + suffix, t
    if path[0] == "frame_position_embeddings":
        return "frame_position_embeddings.weight", False
    if path[0] == "temporal":
        i = int(re.fullmatch(r"resblocks_(\d+)", path[1]).group(1))
        suffix, t = _BLOCK[tuple(path[2:])]
        return f"{TEMPORAL_PREFIX}{i}.{suffix}", t
    if len(path) == 1 and path[0] in MATRICES:
        return path[0], False
    raise KeyError(f"no original name for head parameter {'/'.join(path)}")


def our_path(key: str) -> Tuple[Tuple[str, ...], bool]:
    """Original state_dict key -> (our param path, transposed?)."""
    if key.startswith(SELECTOR_PREFIX):
        suffix = key[len(SELECTOR_PREFIX) :]
        for ours, (orig, t) in _SELECTOR.items():
            if orig == suffix:
                return ("selector",) + ours, t
    elif key == "frame_position_embeddings.weight":
        return ("frame_position_embeddings",), False
    elif key.startswith(TEMPORAL_PREFIX):
        m = re.fullmatch(r"(\d+)\.(.+)", key[len(TEMPORAL_PREFIX) :])
        if m:
            for ours, (orig, t) in _BLOCK.items():
                if orig == m.group(2):
                    return ("temporal", f"resblocks_{m.group(1)}") + ours, t
    elif key in MATRICES:
        return (key,), False
    raise KeyError(f"{key!r} is not a UCoFiA head parameter")


def is_head_key(key: str) -> bool:
    try:
        our_path(key)
        return True
    except KeyError:
        return False


def detect_predictor(sd: Mapping[str, Any]) -> Optional[str]:
    """'new' | 'old' from the selector LayerNorm width vs the position-table width."""
    ln = sd.get(SELECTOR_PREFIX + "in_conv.0.weight")
    if ln is None:
        return None
    d = (
        np.shape(sd["frame_position_embeddings.weight"])[1]
        if "frame_position_embeddings.weight" in sd
        else np.shape(sd[SELECTOR_PREFIX + "in_conv.1.weight"])[1] // 2
    )
    return "old" if np.shape(ln)[0] == 2 * d else "new"


def load_original_head_state_dict(
    sd: Mapping[str, np.ndarray], template=None, *, strict: bool = True
) -> Dict[str, Any]:
    """Original head keys -> our param tree (numpy float32).

    ``template``: our params (e.g. ``head.init(...)['params']``) to check against: every
    shape must match (the error names the parameter and both shapes, e.g. a 12-frame
    checkpoint with a 16-frame head) and, with ``strict``, every template parameter must be
    present. Non-head keys (``clip.*``) and the four unused matrices are ignored.
    """
    if template is not None and "params" in template and "temporal" not in template:
        template = template["params"]
    tmpl = dict(_flatten(template)) if template is not None else None
    out: Dict[str, Any] = {}
    for key, value in sd.items():
        if key in UNUSED_ORIGINAL_KEYS or not is_head_key(key):
            continue
        path, t = our_path(key)
        arr = np.asarray(value, dtype=np.float32)
        arr = arr.T if t else arr
        if tmpl is not None:
            if path not in tmpl:
                raise CheckpointError(
                    f"checkpoint parameter {key} ({'/'.join(path)}) does not exist in "
                    f"this head (e.g. more seqTransf layers than seq_layers)"
                )
            want = tuple(np.shape(tmpl[path]))
            if arr.shape != want:
                hint = ""
                if path[0] == "selector":
                    hint = (
                        f"; the checkpoint has the {detect_predictor(sd)!r} predictor, "
                        f"set config.model.head.predictor accordingly"
                    )
                raise CheckpointError(
                    f"shape mismatch for {key} -> {'/'.join(path)}: checkpoint "
                    f"{tuple(np.shape(value))} (as ours {arr.shape}) vs head {want}"
                    f"{hint}"
                )
        _set(out, path, arr)
    if tmpl is not None and strict:
        got = dict(_flatten(out))
        missing = [original_name(p)[0] for p in tmpl if p not in got]
        if missing:
            raise CheckpointError(f"checkpoint lacks head parameters: {missing}")
    return out


def head_params_to_state_dict(
    params: Mapping[str, Any], *, include_unused: bool = True
) -> Dict[str, np.ndarray]:
    """Our head params -> original state_dict entries (numpy). With ``include_unused``, the
    four never-used matrices are added as identities so the original loader finds them."""
    if "params" in params and "temporal" not in params:
        params = params["params"]
    sd = {}
    for path, value in _flatten(params):
        key, t = original_name(path)
        arr = np.asarray(value, dtype=np.float32)
        sd[key] = arr.T if t else arr
    if include_unused:
        w = sd["word_mat_weight"].shape[0]
        f = sd["frame_logit_weight"].shape[0]
        sd["word_logit_weight"] = np.eye(w, dtype=np.float32)
        sd["word_mat_weight_for_pixel"] = np.eye(w, dtype=np.float32)
        sd["frame_mat_weight"] = np.eye(f, dtype=np.float32)
        sd["frame_mat_weight2"] = np.eye(f, dtype=np.float32)
    return sd


_SHIFT_NET = re.compile(r"^(visual\.transformer\.resblocks\.\d+\.attn)\.net\.(.+)$")


def clip_state_dict_from_checkpoint(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """``clip.*`` keys without the prefix; ``...resblocks.{i}.attn.net.X`` -> ``...attn.X``
    (the token-shift wrapper the original saves for blocks 10-11, SPEC §12.3)."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("clip."):
            continue
        k = _SHIFT_NET.sub(r"\1.\2", key[len("clip.") :])
        if k in out:
            raise CheckpointError(f"checkpoint has both {key} and a plain key mapping to clip.{k}")
        out[k] = value
    return out


def _to_numpy(sd):
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def load_original_checkpoint(path_or_sd, head_template=None) -> Dict[str, Any]:
    """A released UCoFiA ``pytorch_model.bin`` (or its state dict) -> our parts.

    A path is read by ``torch_reader.read_torch_file``: the restricted, bounds-checked
    reader of torch's zip format (no code from the file runs, torch is not needed; only a
    legacy pre-1.6 file would need torch). The keys may carry DDP's ``module.`` prefix and a
    training checkpoint may wrap them in ``state_dict``; CLIP weights may be fp16 (the
    original's ``convert_weights``): everything becomes float32 here.

    Returns {'clip_config', 'clip_params', 'head_params', 'logit_scale', 'predictor',
    'ignored'}. ``head_template`` (our head params) enables the shape checks.
    """
    source = "state dict"
    if isinstance(path_or_sd, Mapping):
        sd = path_or_sd
    else:
        source = str(path_or_sd)
        sd = read_torch_file(source)  # unwraps a {'state_dict': ...} training checkpoint
    sd = _to_numpy(sd)
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        clip_sd = clip_state_dict_from_checkpoint(sd)
        head = load_original_head_state_dict(sd, head_template)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    clip_config = clip_params = None
    if clip_sd:
        clip_config, clip_params = convert_openai_state_dict(clip_sd, source=source)
    ignored = sorted(k for k in sd if not k.startswith("clip.") and not is_head_key(k))
    return {
        "clip_config": clip_config,
        "clip_params": clip_params,
        "head_params": head,
        "logit_scale": None if "clip.logit_scale" not in sd else float(sd["clip.logit_scale"]),
        "predictor": detect_predictor(sd),
        "ignored": ignored,
    }
