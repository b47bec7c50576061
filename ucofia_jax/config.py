"""The config schema: every knob of a run with its default, and the checks before compiling.

:func:`base_config` is the one place where defaults live. The model sections are read off the
modules they configure: ``model.clip`` is ``CLIPConfig``'s fields (plus ``checkpoint``) and
``model.head`` is ``UCoFiAHead``'s fields (plus ``init_temporal_from_clip``), so a default
changed there is changed here. Experiment files (``configs/<name>.py``) start from
:func:`base_config` and override what differs.

Two checks, both fail fast with the offending key in the message:

* :func:`validate` -- the config itself: every key must exist in :func:`base_config` with a
  value of the right type and range, and the sizes must fit together (patch size divides the
  resolution, heads divide widths, the head's position table holds ``max_frames``...). Pure;
  no file system access.
* :func:`check_inputs` -- what the run will read: the CLIP / UCoFiA checkpoints and the
  built dataset, naming the missing files and the command that makes them.

Each layer gets its section: ``Model.from_config(config.model, ...)``,
``VideoTextData(config.data, ...)``, the trainer ``config.train``, the evaluator
``config.eval``, the mesh ``config.mesh``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, List

import ml_collections

from data_pipeline import builder as builder_lib
from data_pipeline import pipeline
from ucofia_jax.kernels.native import LEVEL3_KERNELS
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import clip_import
from ucofia_jax.models import head as head_lib
from ucofia_jax.models import layers as layers_lib
from ucofia_jax.ops.sinkhorn import SK_DOMAINS
from ucofia_jax.ops.topk import NOISE_PRNGS
from ucofia_jax.runtime import distributed, sharding
from ucofia_jax.runtime.errors import ConfigError  # noqa: F401 (config.ConfigError, as before)
from ucofia_jax.training import checkpoints
from ucofia_jax.training.optim import OPTIMIZERS, SCHEDULES

# --mode of ucofia_jax.main -> (train, evaluate)
MODES = {"train": (True, False), "eval": (False, True), "train_and_eval": (True, True)}


# Which CLIP params the original freezes (SPEC §3, main_ucofia.py:445-464): every CLIP param
# outside the resblocks and ln_final/text_projection/logit_scale/visual.ln_post/visual.proj.
FROZEN_CLIP = (
    "token_embedding",
    "positional_embedding",
    "visual/conv1",
    "visual/class_embedding",
    "visual/positional_embedding",
    "visual/ln_pre",
)
# Head fields that are sizes taken from CLIP and the data, not knobs of their own.
_HEAD_SIZES = ("embed_dim", "max_frames", "max_words")
_HEAD_SET_BY_MODEL = ("remat",)  # head fields Model sets from config.model (one switch)
_CONFIG_FIELDS = ("parent", "name")  # flax Module bookkeeping, not fields of the head


def _defaults(cls, skip=()) -> dict:
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in skip and f.name not in _CONFIG_FIELDS and f.init
    }


def base_config() -> ml_collections.ConfigDict:
    """Every knob with its default: the original MSR-VTT recipe (SPEC §9) unless noted."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.experiment = "base"

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    clip = _defaults(clip_lib.CLIPConfig)  # OpenAI ViT-B/32 sizes
    clip["token_shift_blocks"] = (10, 11)  # the recipe: TS2-Net shift on visual blocks 10-11
    # checkpoint: a HF CLIPModel dir or an OpenAI ViT-B-32.pt. Training refuses to start
    # without one unless from_scratch=True says a random CLIP is meant (the demo).
    # vision_heads -1: width // 64 (OpenAI); a HF config.json states its count.
    c.model.clip = ml_collections.ConfigDict(dict(checkpoint="", from_scratch=False, **clip))
    head = _defaults(head_lib.UCoFiAHead, skip=_HEAD_SIZES + _HEAD_SET_BY_MODEL)
    # init_temporal_from_clip: seqTransf <- CLIP text blocks 0..3 (SPEC §5).
    c.model.head = ml_collections.ConfigDict(dict(init_temporal_from_clip=True, **head))
    # A released UCoFiA state dict (pytorch_model.bin) for --mode=eval; '' = none.
    c.model.ucofia_checkpoint = ""
    # Activation rematerialisation of every residual block (CLIP towers and the head's temporal
    # encoder): 'none' | 'full' (least memory) | 'dots' (models/layers.py REMAT_POLICIES).
    # Same parameters and gradients either way; docs/train.md "Memory".
    c.model.remat = "none"

    # ------------------------------------------------------------------ data
    c.data = ml_collections.ConfigDict(
        dict(
            dataset="msrvtt",
            data_dir="data/tfds",  # TFDS data_dir (python -m data_pipeline.build)
            manual_dir="data/raw/msrvtt",  # raw videos + annotation files
            max_words=32,
            max_frames=12,
            image_size=224,
            feature_framerate=1,
            slice_framepos=2,
            jpeg_quality=95,  # of the dataset's stored frames; the search takes the same trip
            expand_sentences=True,  # MSR-VTT 9k: every caption a training sample
            train_split="train",
            eval_split="test",
            prefetch=2,
            num_parallel_calls=-1,  # tf.data.AUTOTUNE
            synthetic=ml_collections.ConfigDict(
                dict(
                    # True: make data_pipeline.synthetic's set (MSR-VTT layout) in the
                    # workdir if absent
                    enabled=False,
                    num_train=300,
                    num_test=100,
                    frame_size=64,
                    num_seconds=4,
                    fps=6,
                    captions_per_video=5,
                    seed=0,
                )
            ),
        )
    )

    # ------------------------------------------------------------------ training
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,  # global batch = number of negatives + 1
            epochs=15,
            num_steps=-1,  # >0: stop after this many steps (smoke runs, benchmarks)
            optimizer="bertadam",  # 'bertadam' (original) | 'adamw'
            lr=1e-4,  # new modules (UCoFiA head)
            clip_lr=1e-7,  # CLIP backbone = lr * coef_lr 1e-3
            warmup_proportion=0.1,
            schedule="warmup_cosine",  # 'warmup_cosine' (original) | 'constant'
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.2,
            grad_clip=1.0,  # global norm clip (main_ucofia.py:278)
            per_tensor_clip=1.0,  # BertAdam's per-tensor clip (optimization.py:135)
            logit_scale_max=4.605170185988092,  # ln 100, clamped after every step
            frozen=FROZEN_CLIP,  # param paths (under 'clip/') that never change
            log_every_steps=10,
            checkpoint_every_steps=1000,
            keep_checkpoints=2,  # >= 2: a damaged latest checkpoint falls back to the previous
            eval_every_epochs=1,  # validation (R@1 picks the best checkpoint)
            stop_on_nonfinite=True,
            # Resuming refuses a changed seed, global batch size, epochs, schedule or data
            # split (the data order or the lr schedule would silently differ); True allows it.
            allow_resume_with_changes=False,
            # Exact gradient accumulation (GradCache): the global batch is encoded in this many
            # micro-batches; the loss still sees all B x B pairs. batch_size must be divisible
            # by accumulate_steps x the mesh's batch shards (data x fsdp).
            accumulate_steps=1,
        )
    )

    # ------------------------------------------------------------------ evaluation
    c.eval = ml_collections.ConfigDict(
        dict(
            batch_size=32,  # encoding batch (texts and videos)
            text_block=256,  # blockwise scoring: texts x videos per block
            video_block=64,
            # Level 3 after its GEMM: 'auto' (the fused native CPU kernel on a CPU backend when
            # a C++ compiler builds it, else XLA), 'xla' or 'native' (insist). Same values to
            # float32 rounding (docs/head.md, "Native CPU kernel"). Training always uses XLA.
            level3_kernel="auto",
            sk_norm=True,
            sk_bank_size=-1,  # training texts in the SK query bank; -1 = all
            sk_iters=4,
            sk_domain="plain",  # 'plain' (original) | 'log' (finite where plain overflows)
            sk_v2t_bank_size=1000,  # training videos for the v2t prior (encoded; costly)
            write_report=False,
        )
    )

    # ------------------------------------------------------------------ devices
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.distributed = ml_collections.ConfigDict(dict(mode="auto"))
    return c


_CHOICES = {
    "model.clip.dtype": (*clip_lib.DTYPES, clip_lib.AUTO_DTYPE),
    "model.head.predictor": head_lib.PREDICTORS,
    "model.remat": tuple(layers_lib.REMAT_POLICIES),
    "model.clip.activation": tuple(layers_lib.ACTIVATIONS),
    "model.head.eval_noise_prng": NOISE_PRNGS,
    "eval.level3_kernel": LEVEL3_KERNELS,
    "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES,
    "eval.sk_domain": SK_DOMAINS,
    "data.dataset": tuple(builder_lib.DATASETS),
    "distributed.mode": distributed.MODES,
}
# Keys that moved: a hint in the unknown-key error.
_MOVED = {"model.head.level3_kernel": "eval.level3_kernel"}


def unknown_key_message(key: str) -> str:
    """For ``config.<key>`` absent from :func:`base_config` (e.g. a command-line override):
    where a moved key went, else the nearest known keys."""
    key = key.removeprefix("config.")
    if key in _MOVED:
        return f"config.{key}: moved to config.{_MOVED[key]}"
    known = [k for k in _flatten(base_config()) if k not in _MOVED]
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not near:
        parent = key.rsplit(".", 1)[0]
        near = sorted(k for k in known if k.rsplit(".", 1)[0] == parent)[:8]
    return f"config.{key}: unknown key" + (
        f" (nearest: {', '.join('config.' + n for n in near)})" if near else ""
    )


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
    "train.accumulate_steps",
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
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out[key] = "__dict__"
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
    """Raise :class:`ConfigError` naming every bad key; return ``config`` unchanged."""
    schema = _flatten(base_config())
    flat = _flatten(config)
    errors = _schema_errors(flat, schema)
    if not errors:  # the value checks need every key, of the right type
        errors = _value_errors(flat) + _size_errors(flat)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return config


def _schema_errors(flat: dict, schema: dict) -> List[str]:
    """Unknown, moved and missing keys; values of the wrong type."""
    errors: List[str] = []
    unknown = sorted(k for k in flat if k not in schema)
    for k in unknown:
        if k in _MOVED:
            errors.append(f"config.{k}: moved to config.{_MOVED[k]}")
            continue
        parent = k.rsplit(".", 1)[0] if "." in k else ""
        near = sorted(s for s in schema if s.rsplit(".", 1)[0] == parent and s != parent)
        errors.append(
            f"config.{k}: unknown key (known keys here: "
            f"{', '.join('config.' + n for n in near[:30])})"
        )
    missing = sorted(k for k in schema if k not in flat)
    for k in missing:
        errors.append(f"config.{k}: missing (start from ucofia_jax.config.base_config())")
    for k, ref in schema.items():
        if k in flat and (ref == "__dict__") != (flat[k] == "__dict__"):
            errors.append(
                f"config.{k}: expected {'a ConfigDict' if ref == '__dict__' else 'a value'}"
            )
        elif k in flat and ref != "__dict__" and not _type_ok(flat[k], ref):
            errors.append(f"config.{k}: expected {type(ref).__name__}, got {flat[k]!r}")
    return errors


def _bad(errors: List[str], flat: dict):
    def bad(key: str, why: str) -> None:
        errors.append(f"config.{key} = {flat[key]!r}: {why}")

    return bad


def _value_errors(flat: dict) -> List[str]:
    """Choices, ranges and the combinations of values the code refuses."""
    errors: List[str] = []
    bad = _bad(errors, flat)
    for k, v in flat.items():  # lr=inf or NaN would train on, or stop late, with a NaN state
        if isinstance(v, float) and not math.isfinite(v):
            bad(k, "must be a finite number")
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

    if flat["eval.level3_kernel"] == "native" and flat["model.head.mask_padding"]:
        bad(
            "eval.level3_kernel",
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
    shards = [flat[k] for k in ("mesh.data", "mesh.fsdp") if flat[k] > 0]
    micro = flat["train.accumulate_steps"] * int(math.prod(shards))
    if flat["train.accumulate_steps"] > 0 and flat["train.batch_size"] % micro:
        bad(
            "train.batch_size",
            f"must be divisible by train.accumulate_steps x the mesh's fixed batch shards "
            f"(mesh.data x mesh.fsdp) = {micro}",
        )
    if flat["eval.sk_bank_size"] == 0 or flat["eval.sk_bank_size"] < -1:
        bad("eval.sk_bank_size", "must be > 0 or -1 (the whole training split)")
    return errors


def _size_errors(flat: dict) -> List[str]:
    """Sizes that must fit together (CLIP, the head and the data)."""
    errors: List[str] = []
    bad = _bad(errors, flat)
    clip = {k.split(".")[-1]: v for k, v in flat.items() if k.startswith("model.clip.")}
    if clip["image_resolution"] % clip["vision_patch_size"]:
        bad(
            "model.clip.vision_patch_size",
            f"must divide model.clip.image_resolution ({clip['image_resolution']})",
        )
    if clip["text_width"] % clip["text_heads"]:
        bad("model.clip.text_heads", f"must divide model.clip.text_width ({clip['text_width']})")
    if clip["vision_heads"] == -1:
        if clip["vision_width"] >= 64 and clip["vision_width"] % 64:
            bad(
                "model.clip.vision_width",
                "must be a multiple of 64 when model.clip.vision_heads = -1 (width // 64); "
                "or set model.clip.vision_heads",
            )
    elif clip["vision_heads"] < 1 or clip["vision_width"] % clip["vision_heads"]:
        bad(
            "model.clip.vision_heads",
            f"must be -1 (width // 64) or divide model.clip.vision_width ({clip['vision_width']})",
        )
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
    return errors


# --------------------------------------------------------------------------- inputs


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Fill workdir-relative defaults ('' data dirs of the demo) in place; returns config."""
    with config.unlocked():
        if not config.data.data_dir:
            config.data.data_dir = os.path.join(workdir, "data", "tfds")
        if not config.data.manual_dir:
            config.data.manual_dir = os.path.join(workdir, "data", "raw")
    return config


OPENAI_VIT_B32_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
)


def check_clip_start(config: ml_collections.ConfigDict, mode: str) -> None:
    """Training needs pretrained CLIP weights unless ``model.clip.from_scratch`` says a random
    CLIP is meant: the recipe's CLIP lr (1e-7) and frozen embeddings leave a random CLIP where
    it started, so a run without weights would spend its compute on nothing. Evaluation reads
    its params from the workdir's checkpoint or ``model.ucofia_checkpoint`` and is not held."""
    clip = config.model.clip
    if clip.from_scratch and clip.checkpoint:
        raise ConfigError(
            f"config.model.clip.from_scratch = True and config.model.clip.checkpoint = "
            f"{clip.checkpoint!r}: choose one (from_scratch=True needs checkpoint='')"
        )
    if not MODES[mode][0] or clip.checkpoint or clip.from_scratch:
        return
    raise ConfigError(
        f"config.model.clip.checkpoint is empty: --mode={mode} would train CLIP from random "
        f"weights (experiment {config.experiment!r}). Download OpenAI's ViT-B/32 "
        f"({OPENAI_VIT_B32_URL}) or a Hugging Face CLIPModel directory (config.json + "
        "model.safetensors, e.g. openai/clip-vit-base-patch32; configs/msrvtt_b16.py and "
        "msrvtt_l14.py need ViT-B/16 and ViT-L/14) and pass it with "
        "--config.model.clip.checkpoint=PATH. To train CLIP from scratch on purpose, pass "
        "--config.model.clip.from_scratch=True."
    )


def _check_clip_heads(clip: ml_collections.ConfigDict, path: str) -> None:
    """Head counts and the activation change no weight's shape, so a config that differs
    from its checkpoint there would load and run, silently wrong: compare before loading."""
    cfg = clip_lib.CLIPConfig.from_ml(clip)
    stated = clip_import.stated_fields(path)
    want = {
        "text_heads": stated.get("text_heads", max(cfg.text_width // 64, 1)),
        "vision_heads": stated.get("vision_heads", clip_lib.openai_vision_heads(cfg.vision_width)),
        "activation": stated.get("activation", "quick_gelu"),
    }
    have = {k: getattr(cfg, k) for k in want}
    wrong = [f"--config.model.clip.{k}={v}" for k, v in want.items() if have[k] != v]
    if wrong:
        raise ConfigError(
            f"config.model.clip: {have} differ from the checkpoint {path!r} "
            f"({'its config.json' if stated else 'OpenAI: heads of 64, quick_gelu'}: {want}); "
            "set " + " ".join(wrong)
        )


def check_devices(config: ml_collections.ConfigDict) -> None:
    """The mesh must hold devices of every process: a process outside it has no rows of the
    batch and cannot read the results (jax.distributed up, before anything compiles)."""
    try:
        mesh = sharding.make_mesh(config.mesh)
        distributed.check_mesh_spans_processes(mesh.devices.flat, "config.mesh")
    except ValueError as e:  # a config problem: one line at the command line, not a traceback
        raise ConfigError(str(e)) from None


def check_inputs(config: ml_collections.ConfigDict, mode: str, workdir: str) -> None:
    """Fail at once when a checkpoint or the built dataset is missing, saying how to make it."""
    check_clip_start(config, mode)
    check_devices(config)
    if mode == "eval" and not config.model.ucofia_checkpoint:
        d, _ = checkpoints.find_checkpoint_dir(workdir)
        if not os.path.isdir(d) or not any(n.isdigit() for n in os.listdir(d)):
            raise FileNotFoundError(
                f"--mode=eval: no checkpoint in {workdir} (checkpoints/ or checkpoints_best/). "
                "Train first (--mode=train_and_eval with this --workdir), or evaluate the "
                "released UCoFiA weights with "
                "--config.model.ucofia_checkpoint=/path/to/pytorch_model.bin"
            )
    ckpt = config.model.clip.checkpoint
    if ckpt and not os.path.exists(ckpt):
        raise FileNotFoundError(
            f"config.model.clip.checkpoint = {ckpt!r} does not exist. Put an OpenAI ViT-B-32.pt or "
            "a Hugging Face CLIPModel directory (config.json + model.safetensors, e.g. "
            "openai/clip-vit-base-patch32) there, or set --config.model.clip.checkpoint='' "
            "--config.model.clip.from_scratch=True to train CLIP from scratch."
        )
    if ckpt:
        _check_clip_heads(config.model.clip, ckpt)
    uckpt = config.model.ucofia_checkpoint
    if uckpt and not os.path.exists(uckpt):
        raise FileNotFoundError(
            f"config.model.ucofia_checkpoint = {uckpt!r} does not exist. Download the released "
            "UCoFiA MSR-VTT checkpoint (pytorch_model.bin, linked from the original README) "
            "to that path, or leave it '' to evaluate a checkpoint of this workdir."
        )
    if config.data.synthetic.enabled:
        return  # made in the workdir by main when absent
    problems = pipeline.dataset_problems(config.data)
    if problems:
        raise FileNotFoundError(problems)
