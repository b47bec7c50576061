"""The config schema: every knob of a run with its default, and the checks of the config alone.

:func:`base_config` is the one place where defaults live, each stated here literally; the
modules it configures take theirs from it (``models.clip.CLIPConfig``,
``models.head.UCoFiAHead``). Experiment files (``configs/<name>.py``) start from
:func:`base_config` and override what differs.

Configs are data: this module imports ml_collections, the standard library and
``ucofia_jax/errors.py`` (its :class:`ConfigError`; that module imports nothing) only, so a
config file loads without TensorFlow, TFDS, Orbax or JAX (tests/test_config.py checks).

:func:`validate` checks the config itself and fails fast naming every bad key: each key must
exist in :func:`base_config` with a value of its type (the ConfigDict's own typing), in
range, and the sizes must fit together (patch size divides the resolution, heads divide
widths, the head's position table holds ``max_frames``...). Pure; no file system access.
What needs the code -- the choices each module offers, the checkpoints and dataset on disk,
the devices -- is checked where the config meets the program (``ucofia_jax/preflight.py``).

Each layer gets its section: ``Model.from_config(config.model, ...)``,
``VideoTextData(config.data, ...)``, the trainer ``config.train``, the evaluator
``config.eval``, the mesh ``config.mesh``.
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, Iterator, List, Optional, Tuple

import ml_collections

from ucofia_jax.errors import ConfigError

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


def base_config() -> ml_collections.ConfigDict:
    """Every knob with its default: the original MSR-VTT recipe (SPEC §9) unless noted."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.experiment = "base"

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    # checkpoint: a HF CLIPModel dir or an OpenAI ViT-B-32.pt. Training refuses to start
    # without one unless from_scratch=True says a random CLIP is meant (the demo).
    # The sizes are OpenAI ViT-B/32's; models/clip.py CLIPConfig takes its defaults from here.
    c.model.clip = ml_collections.ConfigDict(
        dict(
            checkpoint="",
            from_scratch=False,
            embed_dim=512,
            image_resolution=224,
            vision_layers=12,
            vision_width=768,
            vision_patch_size=32,
            context_length=77,
            vocab_size=49408,
            text_width=512,
            text_heads=8,
            text_layers=12,
            token_shift_blocks=(10, 11),  # the recipe: TS2-Net shift on visual blocks 10-11
            token_shift_n_div=7,
            dtype="auto",  # bfloat16 on GPU/TPU, float32 on CPU; or a models/clip.py DTYPES key
            vision_heads=-1,  # -1: width // 64 (OpenAI); a HF config.json states its count
            activation="quick_gelu",  # OpenAI's; OpenCLIP's ViT-H/14 and bigG use "gelu"
        )
    )
    # models/head.py UCoFiAHead takes its defaults from here; its quirk flags keep the
    # original behaviour (documented there).
    c.model.head = ml_collections.ConfigDict(
        dict(
            init_temporal_from_clip=True,  # seqTransf <- CLIP text blocks 0..3 (SPEC §5)
            topk=3,
            num_samples=500,
            sigma=0.05,
            tau=0.01,
            seq_layers=4,
            predictor="new",
            selection_noise_at_eval=True,
            mask_padding=False,
            scale_pixel_word=False,
            eval_local_mat_weight1=False,
            eval_noise_prng="hash",
        )
    )
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
            # Resuming refuses a changed seed, global batch size, epochs, schedule, model.* key
            # or data.* key other than paths and prefetch (the data, its order or the schedule
            # would silently differ); True allows it. Another optimizer or state structure is
            # always refused (training/resume.py).
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
    # logical_axis_rules: (logical axis name, mesh axis / tuple of mesh axes / None = never
    # split) for the names the parameters declare (models/layers.py): the FSDP and
    # tensor-parallel layout. The batch is always split over data x fsdp.
    c.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,
            fsdp=1,
            model=1,
            logical_axis_rules=(
                ("embed", "fsdp"),  # a residual / embedding width
                ("mlp", "model"),  # the MLP hidden
                ("qkv", "model"),  # the packed q|k|v
                ("heads", "model"),  # the concatenated head outputs
                ("vocab", "model"),  # the token table's rows
                ("joint", "model"),  # the joint embedding
                ("norm", None),  # LayerNorm vectors and other small vectors
            ),
        )
    )
    c.distributed = ml_collections.ConfigDict(dict(mode="auto"))
    return c


# --------------------------------------------------------------------------- the checks


def _leaf_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted names of the values (not the sections) of ``cfg``."""
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def unknown_key_message(key: str) -> str:
    """For ``config.<key>`` absent from :func:`base_config` (a typo in a config file or a
    command-line override): the nearest known keys."""
    key = key.removeprefix("config.")
    known = list(_leaf_keys(base_config()))
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not near:
        parent = key.rsplit(".", 1)[0]
        near = sorted(k for k in known if k.rsplit(".", 1)[0] == parent)[:8]
    return f"config.{key}: unknown key" + (
        f" (nearest: {', '.join('config.' + n for n in near)})" if near else ""
    )


def batch_split_error(
    section: str, batch_size: int, batch_shards: int, accumulate_steps: int = 1
) -> Optional[str]:
    """The batch rule, for validation, the mesh and the trainer: ``config.<section>.batch_size``
    splits into ``accumulate_steps`` micro-batches (training), each evenly over the mesh's
    ``batch_shards`` (mesh.data x mesh.fsdp devices). None when it does, else why not."""
    multiple = accumulate_steps * batch_shards
    if multiple > 0 and batch_size % multiple == 0:
        return None
    shards = f"the mesh's batch shards (mesh.data x mesh.fsdp = {batch_shards})"
    if accumulate_steps != 1:
        shards = f"config.train.accumulate_steps ({accumulate_steps}) x {shards} = {multiple}"
    return f"config.{section}.batch_size = {batch_size}: must be divisible by {shards}"


def validate(
    config: ml_collections.ConfigDict,
    more_errors: Callable[[ml_collections.ConfigDict], List[str]] = lambda typed: [],
) -> ml_collections.ConfigDict:
    """Raise :class:`ConfigError` naming every bad key; return ``config`` unchanged.
    ``more_errors(typed)``: checks of the program on a config that passed the schema (its
    choices, in ``ucofia_jax/preflight.py``), reported with these."""
    typed, errors = schema_errors(config)
    if not errors:  # the value checks need every key, of its type
        errors = value_errors(typed) + more_errors(typed)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return config


def schema_errors(
    config: ml_collections.ConfigDict,
) -> Tuple[ml_collections.ConfigDict, List[str]]:
    """(typed, errors): ``config``'s values assigned onto :func:`base_config`, whose ConfigDict
    refuses a value of another type; errors name the unknown, missing and ill-typed keys."""
    typed = base_config()
    errors: List[str] = []
    _assign(typed, config, "", errors)
    return typed, errors


def _assign(schema: ml_collections.ConfigDict, values, prefix: str, errors: List[str]) -> None:
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in schema:
            errors.append(unknown_key_message(key))
        elif isinstance(schema[k], ml_collections.ConfigDict):
            if isinstance(v, (ml_collections.ConfigDict, dict)):
                _assign(schema[k], v, key + ".", errors)
            else:
                errors.append(f"config.{key}: expected a ConfigDict (a section), got {v!r}")
        elif isinstance(v, (ml_collections.ConfigDict, dict)):
            errors.append(f"config.{key}: expected {type(schema[k]).__name__}, got a section")
        elif isinstance(v, bool) and not isinstance(schema[k], bool):
            # ConfigDict takes a bool for a number (bool is an int); batch_size=True is a slip.
            errors.append(f"config.{key}: expected {type(schema[k]).__name__}, got {v!r}")
        else:
            try:
                schema[k] = v
            except TypeError:
                errors.append(f"config.{key}: expected {type(schema[k]).__name__}, got {v!r}")
    for k in schema:
        if k not in values:
            errors.append(
                f"config.{prefix}{k}: missing (start from ucofia_jax.config.base_config())"
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


def value_errors(cfg: ml_collections.ConfigDict) -> List[str]:
    """Ranges, the combinations of values the code refuses, and sizes that must fit
    together, of a config with every key of its type (see :func:`schema_errors`)."""
    errors: List[str] = []

    def bad(key: str, why: str) -> None:
        errors.append(f"config.{key} = {cfg[key]!r}: {why}")

    for k in _leaf_keys(cfg):  # lr=inf or NaN would train on, or stop late, with a NaN state
        if isinstance(cfg[k], float) and not math.isfinite(cfg[k]):
            bad(k, "must be a finite number")
    for k in _POSITIVE:
        if not cfg[k] > 0:
            bad(k, "must be > 0")
    for k in _NON_NEGATIVE:
        if not cfg[k] >= 0:
            bad(k, "must be >= 0")
    for k in _UNIT_INTERVAL:
        if not 0 <= cfg[k] < 1:
            bad(k, "must be in [0, 1)")
    train, mesh = cfg.train, cfg.mesh
    if not (train.epochs > 0 or train.num_steps > 0):
        bad("train.epochs", "train.epochs or train.num_steps must be > 0")
    if train.logit_scale_max <= 0 or not math.isfinite(train.logit_scale_max):
        bad("train.logit_scale_max", "must be a positive finite log-scale")
    for k in ("data", "fsdp", "model"):
        if mesh[k] == 0 or mesh[k] < -1:
            bad(f"mesh.{k}", "must be a positive device count or -1 (all remaining devices)")
    if sum(1 for k in ("data", "fsdp", "model") if mesh[k] == -1) > 1:
        bad("mesh.data", "at most one mesh axis may be -1")
    for p in train.frozen:
        if not isinstance(p, str) or not p:
            bad("train.frozen", f"entries must be param paths under clip/, got {p!r}")
    # The mesh's fixed batch shards here; main checks again once -1 is a device count.
    shards = math.prod(mesh[k] for k in ("data", "fsdp") if mesh[k] > 0)
    if train.accumulate_steps > 0:
        errors.append(batch_split_error("train", train.batch_size, shards, train.accumulate_steps))
    errors.append(batch_split_error("eval", cfg.eval.batch_size, shards))
    if cfg.eval.sk_bank_size == 0 or cfg.eval.sk_bank_size < -1:
        bad("eval.sk_bank_size", "must be > 0 or -1 (the whole training split)")
    return [e for e in errors if e] + _size_errors(cfg)


def _size_errors(cfg: ml_collections.ConfigDict) -> List[str]:
    """Sizes that must fit together (CLIP, the head and the data)."""
    errors: List[str] = []

    def bad(key: str, why: str) -> None:
        errors.append(f"config.{key} = {cfg[key]!r}: {why}")

    clip, head, data = cfg.model.clip, cfg.model.head, cfg.data
    if clip.image_resolution % clip.vision_patch_size:
        bad(
            "model.clip.vision_patch_size",
            f"must divide model.clip.image_resolution ({clip.image_resolution})",
        )
    if clip.text_width % clip.text_heads:
        bad("model.clip.text_heads", f"must divide model.clip.text_width ({clip.text_width})")
    if clip.vision_heads == -1:
        if clip.vision_width >= 64 and clip.vision_width % 64:
            bad(
                "model.clip.vision_width",
                "must be a multiple of 64 when model.clip.vision_heads = -1 (width // 64); "
                "or set model.clip.vision_heads",
            )
    elif clip.vision_heads < 1 or clip.vision_width % clip.vision_heads:
        bad(
            "model.clip.vision_heads",
            f"must be -1 (width // 64) or divide model.clip.vision_width ({clip.vision_width})",
        )
    if clip.embed_dim % 64:
        bad("model.clip.embed_dim", "must be a multiple of 64 (temporal encoder heads = D // 64)")
    for i in clip.token_shift_blocks:
        if not 0 <= int(i) < clip.vision_layers:
            bad("model.clip.token_shift_blocks", f"block {i} outside 0..{clip.vision_layers - 1}")
    grid = clip.image_resolution // max(clip.vision_patch_size, 1)
    tokens = 1 + grid**2
    if clip.token_shift_blocks and tokens < clip.token_shift_n_div:
        bad("model.clip.token_shift_n_div", f"larger than the {tokens} tokens per frame")
    if data.image_size != clip.image_resolution:
        bad("data.image_size", f"must equal model.clip.image_resolution ({clip.image_resolution})")
    if data.max_words > clip.context_length:
        bad("data.max_words", f"exceeds model.clip.context_length ({clip.context_length})")
    if data.max_words < 2:
        bad("data.max_words", "needs room for <|startoftext|> and <|endoftext|> (>= 2)")
    if data.max_frames > 77:
        bad("data.max_frames", "exceeds the 77-row frame position table (SPEC §5)")
    if head.topk > grid * grid:
        bad("model.head.topk", f"more than the {grid * grid} patches per frame")
    if head.init_temporal_from_clip:
        if clip.text_width != clip.embed_dim:
            bad(
                "model.head.init_temporal_from_clip",
                "needs model.clip.text_width == model.clip.embed_dim (blocks are copied)",
            )
        if clip.context_length != 77:
            bad(
                "model.head.init_temporal_from_clip",
                "needs model.clip.context_length == 77 (the frame position table is CLIP's)",
            )
        if head.seq_layers > clip.text_layers:
            bad(
                "model.head.seq_layers",
                f"more than the {clip.text_layers} CLIP text blocks to copy",
            )
    return errors
