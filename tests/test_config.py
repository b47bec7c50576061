"""Every shipped config validates; bad keys / values are rejected naming the key; missing
inputs fail with what to do; config files are data (they load no TensorFlow or JAX). No
model is built or compiled here."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_clip_import import shapes_only_openai_file

from data_pipeline import builder
from ucofia_jax import config as cv
from ucofia_jax import preflight
from ucofia_jax.errors import ConfigError
from ucofia_jax.kernels import native

REPO = Path(__file__).resolve().parents[1]

DATASET_CONFIGS = (
    "msrvtt",
    "msrvtt_b16",
    "msrvtt_l14",
    "msvd",
    "lsmdc",
    "activitynet",
    "didemo",
    "vatex",
)
CONFIGS = DATASET_CONFIGS + ("demo",)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    cv.validate(c)  # the config alone
    preflight.check_config(c)  # and against the code's choices
    assert c.data.max_frames <= 77 and c.data.max_words <= c.model.clip.context_length


def test_paper_recipe_values():
    c = importlib.import_module("configs.msrvtt").get_config()
    assert (c.data.max_words, c.data.max_frames, c.train.batch_size, c.train.epochs) == (
        32,
        12,
        128,
        15,
    )
    assert (c.train.lr, c.train.clip_lr, c.train.weight_decay) == (1e-4, 1e-7, 0.2)
    assert (c.train.b1, c.train.b2, c.train.eps, c.train.warmup_proportion) == (
        0.9,
        0.98,
        1e-6,
        0.1,
    )
    for name in ("activitynet", "didemo"):
        c = importlib.import_module(f"configs.{name}").get_config()
        assert (c.data.max_words, c.data.max_frames) == (64, 64)
        assert not c.data.expand_sentences  # one paragraph per video


def _demo():
    return importlib.import_module("configs.demo").get_config()


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: setattr(c.train, "learnig_rate", 1.0), "config.train.learnig_rate"),
        (
            lambda c: c.model.clip.update({"vision_patch_size": 7}),
            "config.model.clip.vision_patch_size",
        ),
        (lambda c: c.train.update({"optimizer": "sgd"}), "config.train.optimizer"),
        (lambda c: c.data.update({"max_frames": 100}), "config.data.max_frames"),
        (lambda c: c.data.update({"image_size": 64}), "config.data.image_size"),
        (lambda c: c.train.update({"warmup_proportion": 1.5}), "config.train.warmup_proportion"),
        (lambda c: c.model.clip.update({"embed_dim": 96}), "config.model.clip.embed_dim"),
        (lambda c: c.mesh.update({"data": 0}), "config.mesh.data"),
        (lambda c: c.eval.update({"sk_bank_size": 0}), "config.eval.sk_bank_size"),
    ],
)
def test_bad_values_name_the_key(mutate, key):
    c = _demo()
    with c.unlocked():
        mutate(c)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        preflight.check_config(c)


def test_a_key_in_another_section_names_where_it_is():
    # An unknown key's nearest known keys, from every section (eval.level3_kernel once was a
    # head field).
    c = _demo()
    with c.unlocked():
        c.model.head.level3_kernel = "xla"
    with pytest.raises(
        ConfigError,
        match=r"config\.model\.head\.level3_kernel: unknown key \(nearest: config\.eval\.level3_kernel",
    ):
        cv.validate(c)


def test_choices_come_from_the_code_that_uses_them():
    # One list per choice: a value the code accepts is a value the schema accepts.
    assert preflight.CHOICES["eval.level3_kernel"] is native.LEVEL3_KERNELS
    assert preflight.CHOICES["data.dataset"] == tuple(builder.DATASETS)
    c = _demo()
    c.eval.level3_kernel = "fast"
    with pytest.raises(ConfigError, match=r"config\.eval\.level3_kernel = 'fast': must be one of"):
        preflight.check_config(c)
    cv.validate(c)  # the pure check knows no code's choices


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("jpeg_quality", 0, r"config\.data\.jpeg_quality must be in 1\.\.100"),
        ("slice_framepos", 5, r"config\.data\.slice_framepos must be one of"),
    ],
)
def test_frame_sampling_is_checked_before_a_run(key, value, why):
    # The sampling spec's own rules, reported with the other config errors before compiling.
    c = _demo()
    c.data[key] = value
    with pytest.raises(ConfigError, match=why):
        preflight.check_config(c)


def test_wrong_type_names_the_key():
    c = _demo()
    with c.ignore_type():  # ConfigDict itself refuses float into an int field
        c.train.batch_size = 32.5
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size: expected int, got 32\.5"):
        cv.validate(c)


@pytest.mark.parametrize(
    "mutate, line",
    [
        (lambda c: setattr(c.model.clip, "dtype", 16), "config.model.clip.dtype: expected str"),
        (
            lambda c: setattr(c.data, "synthetic", True),
            "config.data.synthetic: expected a ConfigDict",
        ),
        (
            lambda c: setattr(c.train, "frozen", "visual/conv1"),
            "config.train.frozen: expected tuple",
        ),
        (lambda c: setattr(c.eval, "sk_norm", 1), "config.eval.sk_norm: expected bool"),
        (lambda c: setattr(c.train, "batch_size", True), "config.train.batch_size: expected int"),
        (lambda c: c.data.__delitem__("prefetch"), "config.data.prefetch: missing"),
    ],
)
def test_the_schema_is_base_config_typed(mutate, line):
    # The user's values assigned onto base_config(): its ConfigDict refuses another type.
    c = _demo()
    with c.unlocked(), c.ignore_type():
        mutate(c)
    with pytest.raises(ConfigError) as err:
        cv.validate(c)
    assert line in str(err.value)


def test_every_error_is_reported_at_once():
    c = _demo()
    with c.unlocked(), c.ignore_type():
        c.train.learnig_rate = 1.0
        c.eval.batch_size = "40"
    with pytest.raises(ConfigError) as err:
        cv.validate(c)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2, lines
    assert "config.train.learnig_rate: unknown key (nearest: " in str(err.value)


def test_an_int_value_of_a_float_key_is_a_float():
    c = _demo()
    c.train.lr = 1  # ConfigDict casts int into a float field: valid, as before
    cv.validate(c)


def test_the_batch_rule_is_one_function():
    # Validation (the mesh's fixed axes), main's mesh (every device) and the trainer ask it.
    assert cv.batch_split_error("train", 32, 4, 2) is None
    assert cv.batch_split_error("eval", 40, 8) is None
    msg = cv.batch_split_error("train", 36, 4, 2)
    assert msg.startswith("config.train.batch_size = 36: must be divisible by")
    assert "config.train.accumulate_steps (2)" in msg and "= 8" in msg
    assert cv.batch_split_error("eval", 30, 4).startswith("config.eval.batch_size = 30")
    assert cv.batch_split_error("train", 32, 4, 0)  # no micro-batches: refused, no crash
    c = _demo()
    c.mesh.data = 2
    c.train.accumulate_steps = 3  # 32 % (3 x 2)
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size = 32: must be divisible"):
        cv.validate(c)
    c.train.accumulate_steps = 1
    c.mesh.data = 16  # train 32 divides, eval 40 does not
    with pytest.raises(ConfigError, match=r"config\.eval\.batch_size = 40: must be divisible"):
        cv.validate(c)


def test_native_kernel_refuses_masks_naming_the_key():
    c = _demo()
    c.model.head.mask_padding = True
    c.eval.level3_kernel = "native"
    with pytest.raises(ConfigError, match=r"config\.eval\.level3_kernel = 'native' takes no masks"):
        preflight.check_config(c)
    c.eval.level3_kernel = "auto"  # falls back to XLA
    preflight.check_config(c)


# --------------------------------------------------------------------------- configs are data

HEAVY = ("tensorflow", "tensorflow_datasets", "jax", "flax", "orbax")


def _loaded_heavy(module: str):
    code = (  # import it and build its config, as a launcher or a notebook would
        f"import importlib, sys\n"
        f"m = importlib.import_module({module!r})\n"
        f"(getattr(m, 'get_config', None) or m.base_config)()\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize(
    "module",
    ["ucofia_jax.config"]
    + [
        f"configs.{p.stem}" for p in sorted((REPO / "configs").glob("*.py")) if p.stem != "__init__"
    ],
)
def test_config_files_load_no_tensorflow_or_jax(module):
    # A config is data: reading one (a notebook, a launcher, a sweep) pays for ml_collections,
    # not for TensorFlow, TFDS, Orbax or JAX.
    assert _loaded_heavy(module) == "[]"


def test_missing_checkpoint_says_what_to_do(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.model.clip.checkpoint = str(tmp_path / "ViT-B-32.pt")
    with pytest.raises(FileNotFoundError, match=r"ViT-B-32\.pt.*from scratch"):
        preflight.check_inputs(c, "train", str(tmp_path))


def test_missing_dataset_names_files_and_command(tmp_path):
    c = importlib.import_module("configs.msvd").get_config()
    c.model.clip.from_scratch = True  # past the CLIP guard, to the dataset check
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.manual_dir = str(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match=r"python -m data_pipeline\.build --dataset=msvd"):
        preflight.check_inputs(c, "train", str(tmp_path))


# --------------------------------------------------------------------------- the CLIP guard


@pytest.mark.parametrize("name", DATASET_CONFIGS)
@pytest.mark.parametrize("mode", ["train", "train_and_eval"])
def test_dataset_configs_refuse_to_train_without_clip(name, mode, tmp_path):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.model.clip.checkpoint == "" and not c.model.clip.from_scratch
    with pytest.raises(ConfigError) as err:
        preflight.check_inputs(c, mode, str(tmp_path))
    msg = str(err.value)
    assert "config.model.clip.checkpoint is empty" in msg
    assert preflight.OPENAI_VIT_B32_URL in msg and "openai/clip-vit-base-patch32" in msg  # where
    assert "--config.model.clip.checkpoint=PATH" in msg  # how to pass it
    assert "--config.model.clip.from_scratch=True" in msg  # the way out on purpose


def test_guard_runs_before_the_dataset_check(tmp_path):
    # No dataset either: the CLIP message comes first (it is the one to fix before building).
    c = importlib.import_module("configs.msvd").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(ConfigError, match="clip.checkpoint is empty"):
        preflight.check_inputs(c, "train", str(tmp_path))


def test_from_scratch_on_purpose_passes_the_guard(tmp_path):
    c = importlib.import_module("configs.msvd").get_config()
    c.model.clip.from_scratch = True
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # the next check
        preflight.check_inputs(c, "train", str(tmp_path))
    assert _demo().model.clip.from_scratch  # the demo trains a random CLIP on purpose
    preflight.check_clip_start(_demo(), "train")


def test_from_scratch_with_a_checkpoint_is_refused(tmp_path):
    c = _demo()
    c.model.clip.checkpoint = str(tmp_path)
    with pytest.raises(ConfigError, match="choose one"):
        preflight.check_inputs(c, "train", str(tmp_path))


def test_eval_of_a_trained_workdir_is_not_held(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    (tmp_path / "checkpoints" / "120").mkdir(parents=True)  # a step dir, as Orbax writes
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the guard
        preflight.check_inputs(c, "eval", str(tmp_path))


def test_eval_of_the_released_checkpoint_is_not_held(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    released = tmp_path / "pytorch_model.bin"
    released.write_bytes(b"")
    c.model.ucofia_checkpoint = str(released)
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the guard
        preflight.check_inputs(c, "eval", str(tmp_path / "fresh_workdir"))


def _hf_dir(path, text_heads, vision_heads):
    path.mkdir()
    cfg = {
        "model_type": "clip",
        "text_config": {"num_attention_heads": text_heads},
        "vision_config": {"num_attention_heads": vision_heads},
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_heads_that_differ_from_the_checkpoint_are_refused(tmp_path):
    # Heads change no weight's shape: a wrong count would load and run, silently wrong.
    c = importlib.import_module("configs.msrvtt").get_config()  # 768 wide: 12 heads of 64
    c.model.clip.checkpoint = _hf_dir(tmp_path / "hf", text_heads=8, vision_heads=16)
    with pytest.raises(ConfigError, match=r"--config\.model\.clip\.vision_heads=16"):
        preflight.check_inputs(c, "train", str(tmp_path))
    c.model.clip.vision_heads = 16  # as its config.json says: past the check, to the dataset
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):
        preflight.check_inputs(c, "train", str(tmp_path))
    # An OpenAI file states no heads: width // 64 (12 for 768), so 16 is refused.
    # (a readable file: one that cannot be read is named as such, tests/test_clip_import.py)
    c.model.clip.checkpoint = shapes_only_openai_file(tmp_path / "ViT-B-32.pt", c.model.clip)
    with pytest.raises(ConfigError, match=r"vision_heads=12"):
        preflight.check_inputs(c, "train", str(tmp_path))


def test_vision_heads_values():
    c = _demo()
    c.model.clip.update(dict(vision_width=160, vision_heads=2))  # heads of 80
    cv.validate(c)
    c.model.clip.vision_heads = 3
    with pytest.raises(ConfigError, match=r"config\.model\.clip\.vision_heads"):
        cv.validate(c)
    c.model.clip.vision_heads = -1  # width // 64 needs a multiple of 64
    with pytest.raises(ConfigError, match=r"config\.model\.clip\.vision_width"):
        cv.validate(c)


def test_activation_that_differs_from_the_checkpoint_is_refused(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    path = _hf_dir(tmp_path / "hf", text_heads=8, vision_heads=12)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        cfg[tower]["hidden_act"] = "gelu"  # OpenCLIP's
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    c.model.clip.checkpoint = path
    with pytest.raises(ConfigError, match=r"--config\.model\.clip\.activation=gelu"):
        preflight.check_inputs(c, "train", str(tmp_path))
    c.model.clip.activation = "gelu"
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the check
        preflight.check_inputs(c, "train", str(tmp_path))


def test_a_mesh_the_devices_cannot_hold_is_a_config_error():
    # Before compile, one line at the command line (ConfigError); the multi-process case (a
    # process left without devices) is tests/test_launch.py's.
    c = _demo()
    c.mesh.data = 64
    with pytest.raises(ConfigError, match=r"needs 64 devices"):
        preflight.check_devices(c)
    c.mesh.data = -1
    preflight.check_devices(c)  # all devices: fine
