"""Where the config meets the program: the checks of a run before anything compiles.

``ucofia_jax/config.py`` checks a config on its own (pure, importing no code of ours). What
needs the code is checked here, beside ``main`` that runs it:

* :func:`check_config` -- :func:`ucofia_jax.config.validate` plus each choice against the
  values its module offers (``CHOICES``: the tuples live where they are implemented), the
  native kernel's rule on masks (``native.check_takes_masks``) and the logical axis rules
  (``sharding.rules_table`` of ``config.mesh.logical_axis_rules``).
* :func:`check_inputs` -- what the run will read and run on: the CLIP / UCoFiA checkpoints,
  the built dataset and the devices, naming the missing files and the command that makes them.

Every failure names the config key or the file.
"""

from __future__ import annotations

import os
from typing import List

import ml_collections

from data_pipeline import builder as builder_lib
from data_pipeline import pipeline
from data_pipeline.sampling import FrameSampling
from ucofia_jax import config as config_lib
from ucofia_jax.errors import ConfigError
from ucofia_jax.kernels import native
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import clip_import
from ucofia_jax.models import head as head_lib
from ucofia_jax.models import layers as layers_lib
from ucofia_jax.ops.sinkhorn import SK_DOMAINS
from ucofia_jax.ops.topk import NOISE_PRNGS
from ucofia_jax.runtime import distributed, sharding
from ucofia_jax.training import checkpoints
from ucofia_jax.training.optim import OPTIMIZERS, SCHEDULES

# --mode of ucofia_jax.main -> (train, evaluate)
MODES = {"train": (True, False), "eval": (False, True), "train_and_eval": (True, True)}

# config key -> the values the code offers, read off the module that implements them.
CHOICES = {
    "model.clip.dtype": (*clip_lib.DTYPES, clip_lib.AUTO_DTYPE),
    "model.head.predictor": head_lib.PREDICTORS,
    "model.remat": tuple(layers_lib.REMAT_POLICIES),
    "model.clip.activation": tuple(layers_lib.ACTIVATIONS),
    "model.head.eval_noise_prng": NOISE_PRNGS,
    "eval.level3_kernel": native.LEVEL3_KERNELS,
    "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES,
    "eval.sk_domain": SK_DOMAINS,
    "data.dataset": tuple(builder_lib.DATASETS),
    "distributed.mode": distributed.MODES,
}


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """:func:`ucofia_jax.config.validate` and the choices the code offers: raise
    :class:`ConfigError` naming every bad key; return ``config`` unchanged."""
    return config_lib.validate(config, more_errors=_code_errors)


def _code_errors(cfg: ml_collections.ConfigDict) -> List[str]:
    errors = [
        f"config.{k} = {cfg[k]!r}: must be one of {choices}"
        for k, choices in CHOICES.items()
        if cfg[k] not in choices
    ]
    rules = (
        lambda: native.check_takes_masks(
            cfg.eval.level3_kernel, mask_padding=cfg.model.head.mask_padding
        ),
        lambda: sharding.rules_table(cfg.mesh.logical_axis_rules),
        lambda: FrameSampling.from_config(cfg.data),  # the spec's own checks, before a decode
    )
    for rule in rules:
        try:
            rule()
        except ValueError as e:
            errors.append(str(e))
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
