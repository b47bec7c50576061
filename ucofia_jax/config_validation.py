"""Validate a run's ConfigDict before anything is compiled.

Two checks, both fail fast with the offending key in the message:

* :func:`validate` -- the config itself: every key must exist in the base schema
  (``configs/common.py``) with a value of the right type and range, and the sizes must fit
  together (patch size divides the resolution, heads divide widths, the head's position
  table holds ``max_frames``...). Pure; no file system access.
* :func:`check_inputs` -- what the run will read: the CLIP / UCoFiA checkpoints and the
  built dataset, naming the missing files and the command that makes them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, List

import ml_collections


class ConfigError(ValueError):
    """A bad config value; the message names the key (``config.a.b``)."""


_CHOICES = {
    "model.clip.dtype": ("float32", "bfloat16"),
    "model.head.predictor": ("new", "old"),
    "model.head.eval_noise_prng": ("hash", "threefry"),
    "model.head.level3_kernel": ("auto", "xla", "native"),
    "train.optimizer": ("bertadam", "adamw"),
    "train.schedule": ("warmup_cosine", "constant"),
    "eval.sk_domain": ("plain", "log"),
    "data.dataset": ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "vatex"),
    "distributed.mode": ("auto", "on", "off"),
}
_POSITIVE = (
    "model.clip.embed_dim",
    "model.clip.image_resolution",
    "model.clip.vision_layers",
    "model.clip.vision_width",
    "model.clip.vision_patch_size",
    "model.clip.context_length",
    "model.clip.vocab_size",
    "model.clip.text_width",
    "model.clip.text_heads",
    "model.clip.text_layers",
    "model.clip.token_shift_n_div",
    "model.head.topk",
    "model.head.num_samples",
    "model.head.seq_layers",
    "model.head.tau",
    "model.head.sigma",
    "data.max_words",
    "data.max_frames",
    "data.image_size",
    "train.batch_size",
    "eval.batch_size",
    "eval.text_block",
    "eval.video_block",
    "eval.sk_iters",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.eps",
)
_NON_NEGATIVE = (
    "train.epochs",
    "train.lr",
    "train.clip_lr",
    "train.weight_decay",
    "train.grad_clip",
    "train.per_tensor_clip",
    "train.eval_every_epochs",
)
_UNIT_INTERVAL = ("train.warmup_proportion", "train.b1", "train.b2")


def _flatten(cfg: Any, prefix: str = "") -> dict:
    out = {}
    items = cfg.items() if hasattr(cfg, "items") else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out[key] = "__dict__"
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _get(flat: dict, key: str) -> Any:
    return flat[key]


def _type_ok(value: Any, ref: Any) -> bool:
    if ref is None or value is None:
        return True
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if isinstance(ref, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ref, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(ref, str):
        return isinstance(value, str)
    if isinstance(ref, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise :class:`ConfigError` naming the first bad key; return ``config`` unchanged."""
    from configs import common  # the schema: every knob with its default

    schema = _flatten(common.get_base_config())
    flat = _flatten(config)
    errors: List[str] = []

    unknown = sorted(k for k in flat if k not in schema)
    for k in unknown:
        parent = k.rsplit(".", 1)[0] if "." in k else ""
        near = sorted(s for s in schema if s.rsplit(".", 1)[0] == parent and s != parent)
        errors.append(
            f"config.{k}: unknown key (known keys here: "
            f"{', '.join('config.' + n for n in near[:30])})"
        )
    missing = sorted(k for k in schema if k not in flat)
    for k in missing:
        errors.append(f"config.{k}: missing (start from configs/common.get_base_config())")
    for k, ref in schema.items():
        if k in flat and (ref == "__dict__") != (flat[k] == "__dict__"):
            errors.append(
                f"config.{k}: expected {'a ConfigDict' if ref == '__dict__' else 'a value'}"
            )
        elif k in flat and ref != "__dict__" and not _type_ok(flat[k], ref):
            errors.append(f"config.{k}: expected {type(ref).__name__}, got {flat[k]!r}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    def bad(key: str, why: str) -> None:
        errors.append(f"config.{key} = {flat[key]!r}: {why}")

    for k, choices in _CHOICES.items():
        if flat[k] not in choices:
            bad(k, f"must be one of {choices}")
    for k in _POSITIVE:
        if not flat[k] > 0:
            bad(k, "must be > 0")
    for k in _NON_NEGATIVE:
        if not flat[k] >= 0:
            bad(k, "must be >= 0")
    for k in _UNIT_INTERVAL:
        if not 0 <= flat[k] < 1:
            bad(k, "must be in [0, 1)")
    if not (flat["train.epochs"] > 0 or flat["train.num_steps"] > 0):
        bad("train.epochs", "train.epochs or train.num_steps must be > 0")

    # Sizes that must fit together.
    clip = {k.split(".")[-1]: v for k, v in flat.items() if k.startswith("model.clip.")}
    if clip["image_resolution"] % clip["vision_patch_size"]:
        bad(
            "model.clip.vision_patch_size",
            f"must divide model.clip.image_resolution ({clip['image_resolution']})",
        )
    if clip["text_width"] % clip["text_heads"]:
        bad("model.clip.text_heads", f"must divide model.clip.text_width ({clip['text_width']})")
    if clip["vision_width"] >= 64 and clip["vision_width"] % 64:
        bad("model.clip.vision_width", "must be a multiple of 64 (vision heads = width // 64)")
    if clip["embed_dim"] % 64:
        bad("model.clip.embed_dim", "must be a multiple of 64 (temporal encoder heads = D // 64)")
    for i in clip["token_shift_blocks"]:
        if not 0 <= int(i) < clip["vision_layers"]:
            bad(
                "model.clip.token_shift_blocks", f"block {i} outside 0..{clip['vision_layers'] - 1}"
            )
    tokens = 1 + (clip["image_resolution"] // max(clip["vision_patch_size"], 1)) ** 2
    if clip["token_shift_blocks"] and tokens < clip["token_shift_n_div"]:
        bad("model.clip.token_shift_n_div", f"larger than the {tokens} tokens per frame")
    if flat["data.image_size"] != clip["image_resolution"]:
        bad(
            "data.image_size",
            f"must equal model.clip.image_resolution ({clip['image_resolution']})",
        )
    if flat["data.max_words"] > clip["context_length"]:
        bad("data.max_words", f"exceeds model.clip.context_length ({clip['context_length']})")
    if flat["data.max_words"] < 2:
        bad("data.max_words", "needs room for <|startoftext|> and <|endoftext|> (>= 2)")
    if flat["data.max_frames"] > 77:
        bad("data.max_frames", "exceeds the 77-row frame position table (SPEC §5)")
    if flat["data.multi_sentence"] and flat["data.paragraph"]:
        bad("data.paragraph", "cannot be combined with data.multi_sentence")
    grid = clip["image_resolution"] // max(clip["vision_patch_size"], 1)
    if flat["model.head.topk"] > grid * grid:
        bad("model.head.topk", f"more than the {grid * grid} patches per frame")
    if flat["model.head.init_temporal_from_clip"]:
        if clip["text_width"] != clip["embed_dim"]:
            bad(
                "model.head.init_temporal_from_clip",
                "needs model.clip.text_width == model.clip.embed_dim (blocks are copied)",
            )
        if clip["context_length"] != 77:
            bad(
                "model.head.init_temporal_from_clip",
                "needs model.clip.context_length == 77 (the frame position table is CLIP's)",
            )
        if flat["model.head.seq_layers"] > clip["text_layers"]:
            bad(
                "model.head.seq_layers",
                f"more than the {clip['text_layers']} CLIP text blocks to copy",
            )
    if flat.get("model.head.level3_kernel") == "native" and flat["model.head.mask_padding"]:
        bad(
            "model.head.level3_kernel",
            "'native' takes no masks; model.head.mask_padding=True needs 'auto' or 'xla'",
        )
    if flat["train.logit_scale_max"] <= 0 or not math.isfinite(flat["train.logit_scale_max"]):
        bad("train.logit_scale_max", "must be a positive finite log-scale")
    for k in ("mesh.data", "mesh.fsdp", "mesh.model"):
        if flat[k] == 0 or flat[k] < -1:
            bad(k, "must be a positive device count or -1 (all remaining devices)")
    if sum(1 for k in ("mesh.data", "mesh.fsdp", "mesh.model") if flat[k] == -1) > 1:
        bad("mesh.data", "at most one mesh axis may be -1")
    for p in flat["train.frozen"]:
        if not isinstance(p, str) or not p:
            bad("train.frozen", f"entries must be param paths under clip/, got {p!r}")
    if flat["eval.sk_bank_size"] == 0 or flat["eval.sk_bank_size"] < -1:
        bad("eval.sk_bank_size", "must be > 0 or -1 (the whole training split)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return config


# --------------------------------------------------------------------------- inputs


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Fill workdir-relative defaults ('' data dirs of the demo) in place; returns config."""
    with config.unlocked():
        if not config.data.data_dir:
            config.data.data_dir = os.path.join(workdir, "data", "tfds")
        if not config.data.manual_dir:
            config.data.manual_dir = os.path.join(workdir, "data", "raw")
    return config


def _missing_files(paths: Iterable[str]) -> List[str]:
    return [p for p in paths if not os.path.exists(p)]


def check_inputs(config: ml_collections.ConfigDict, mode: str) -> None:
    """Fail at once when a checkpoint or the built dataset is missing, saying how to make it."""
    ckpt = config.model.clip.checkpoint
    if ckpt and not os.path.exists(ckpt):
        raise FileNotFoundError(
            f"config.model.clip.checkpoint = {ckpt!r} does not exist. Put an OpenAI ViT-B-32.pt or "
            "a Hugging Face CLIPModel directory (config.json + model.safetensors, e.g. "
            "openai/clip-vit-base-patch32) there, or set --config.model.clip.checkpoint='' to "
            "train CLIP from scratch."
        )
    uckpt = config.model.ucofia_checkpoint
    if uckpt and not os.path.exists(uckpt):
        raise FileNotFoundError(
            f"config.model.ucofia_checkpoint = {uckpt!r} does not exist. Download the released "
            "UCoFiA MSR-VTT checkpoint (pytorch_model.bin, linked from the original README) "
            "to that path, or leave it '' to evaluate a checkpoint of this workdir."
        )
    if config.data.synthetic.enabled:
        return  # made in the workdir by main when absent
    problems = dataset_problems(config)
    if problems:
        raise FileNotFoundError(problems)


def dataset_problems(config: ml_collections.ConfigDict) -> str:
    """'' when the built dataset is there; otherwise what is missing and how to build it."""
    from data_pipeline import builder as builder_lib  # pylint: disable=g-import-not-at-top
    from data_pipeline.records import DataError  # pylint: disable=g-import-not-at-top

    d = config.data
    b = builder_lib.get_builder(
        d.dataset,
        data_dir=d.data_dir,
        max_frames=d.max_frames,
        image_size=d.image_size,
        feature_framerate=d.feature_framerate,
        slice_framepos=d.slice_framepos,
    )
    if b.is_prepared():
        return ""
    try:
        builder_lib.check_manual_dir(d.dataset, d.manual_dir)
        raw = f"The raw files in config.data.manual_dir = {d.manual_dir!r} look complete."
    except DataError as e:
        raw = f"Raw files first (config.data.manual_dir): {e}"
    cmd = (
        f"python -m data_pipeline.build --dataset={d.dataset} --manual_dir={d.manual_dir} "
        f"--data_dir={d.data_dir} --max_frames={d.max_frames} --image_size={d.image_size}"
    )
    if d.feature_framerate != 1:
        cmd += f" --feature_framerate={d.feature_framerate}"
    if d.slice_framepos != 2:
        cmd += f" --slice_framepos={d.slice_framepos}"
    return (
        f"the {d.dataset} dataset ({b.builder_config.name}) is not built in "
        f"config.data.data_dir = {d.data_dir!r}.\n{raw}\nThen build it with:\n  {cmd}"
    )
