"""Every shipped config validates; bad keys / values are rejected naming the key; missing
inputs fail with what to do. No model is built or compiled here."""

import importlib
import json

import pytest

from data_pipeline import builder
from ucofia_jax import config as cv
from ucofia_jax.kernels import native

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
    cv.validate(c)
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
    with pytest.raises(cv.ConfigError, match=key.replace(".", r"\.")):
        cv.validate(c)


def test_moved_key_says_where_it_went():
    c = _demo()
    with c.unlocked():
        c.model.head.level3_kernel = "xla"
    with pytest.raises(cv.ConfigError, match=r"model\.head\.level3_kernel: moved to config\.eval"):
        cv.validate(c)


def test_choices_come_from_the_code_that_uses_them():
    # One list per choice: a value the code accepts is a value the schema accepts.
    assert cv._CHOICES["eval.level3_kernel"] is native.LEVEL3_KERNELS
    assert cv._CHOICES["data.dataset"] == tuple(builder.DATASETS)
    c = _demo()
    c.eval.level3_kernel = "fast"
    with pytest.raises(cv.ConfigError, match=r"config\.eval\.level3_kernel"):
        cv.validate(c)


def test_wrong_type_names_the_key():
    c = _demo()
    with c.ignore_type():  # ConfigDict itself refuses float into an int field
        c.train.batch_size = 32.5
    with pytest.raises(cv.ConfigError, match=r"config\.train\.batch_size"):
        cv.validate(c)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.model.clip.checkpoint = str(tmp_path / "ViT-B-32.pt")
    with pytest.raises(FileNotFoundError, match=r"ViT-B-32\.pt.*from scratch"):
        cv.check_inputs(c, "train", str(tmp_path))


def test_missing_dataset_names_files_and_command(tmp_path):
    c = importlib.import_module("configs.msvd").get_config()
    c.model.clip.from_scratch = True  # past the CLIP guard, to the dataset check
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.manual_dir = str(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match=r"python -m data_pipeline\.build --dataset=msvd"):
        cv.check_inputs(c, "train", str(tmp_path))


# --------------------------------------------------------------------------- the CLIP guard


@pytest.mark.parametrize("name", DATASET_CONFIGS)
@pytest.mark.parametrize("mode", ["train", "train_and_eval"])
def test_dataset_configs_refuse_to_train_without_clip(name, mode, tmp_path):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.model.clip.checkpoint == "" and not c.model.clip.from_scratch
    with pytest.raises(cv.ConfigError) as err:
        cv.check_inputs(c, mode, str(tmp_path))
    msg = str(err.value)
    assert "config.model.clip.checkpoint is empty" in msg
    assert cv.OPENAI_VIT_B32_URL in msg and "openai/clip-vit-base-patch32" in msg  # where
    assert "--config.model.clip.checkpoint=PATH" in msg  # how to pass it
    assert "--config.model.clip.from_scratch=True" in msg  # the way out on purpose


def test_guard_runs_before_the_dataset_check(tmp_path):
    # No dataset either: the CLIP message comes first (it is the one to fix before building).
    c = importlib.import_module("configs.msvd").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(cv.ConfigError, match="clip.checkpoint is empty"):
        cv.check_inputs(c, "train", str(tmp_path))


def test_from_scratch_on_purpose_passes_the_guard(tmp_path):
    c = importlib.import_module("configs.msvd").get_config()
    c.model.clip.from_scratch = True
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # the next check
        cv.check_inputs(c, "train", str(tmp_path))
    assert _demo().model.clip.from_scratch  # the demo trains a random CLIP on purpose
    cv.check_clip_start(_demo(), "train")


def test_from_scratch_with_a_checkpoint_is_refused(tmp_path):
    c = _demo()
    c.model.clip.checkpoint = str(tmp_path)
    with pytest.raises(cv.ConfigError, match="choose one"):
        cv.check_inputs(c, "train", str(tmp_path))


def test_eval_of_a_trained_workdir_is_not_held(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    (tmp_path / "checkpoints" / "120").mkdir(parents=True)  # a step dir, as Orbax writes
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the guard
        cv.check_inputs(c, "eval", str(tmp_path))


def test_eval_of_the_released_checkpoint_is_not_held(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    c.data.data_dir = str(tmp_path / "tfds")
    released = tmp_path / "pytorch_model.bin"
    released.write_bytes(b"")
    c.model.ucofia_checkpoint = str(released)
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the guard
        cv.check_inputs(c, "eval", str(tmp_path / "fresh_workdir"))


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
    with pytest.raises(cv.ConfigError, match=r"--config\.model\.clip\.vision_heads=16"):
        cv.check_inputs(c, "train", str(tmp_path))
    c.model.clip.vision_heads = 16  # as its config.json says: past the check, to the dataset
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):
        cv.check_inputs(c, "train", str(tmp_path))
    # An OpenAI file states no heads: width // 64 (12 for 768), so 16 is refused.
    pt = tmp_path / "ViT-B-32.pt"
    pt.write_bytes(b"")
    c.model.clip.checkpoint = str(pt)
    with pytest.raises(cv.ConfigError, match=r"vision_heads=12"):
        cv.check_inputs(c, "train", str(tmp_path))


def test_vision_heads_values():
    c = _demo()
    c.model.clip.update(dict(vision_width=160, vision_heads=2))  # heads of 80
    cv.validate(c)
    c.model.clip.vision_heads = 3
    with pytest.raises(cv.ConfigError, match=r"config\.model\.clip\.vision_heads"):
        cv.validate(c)
    c.model.clip.vision_heads = -1  # width // 64 needs a multiple of 64
    with pytest.raises(cv.ConfigError, match=r"config\.model\.clip\.vision_width"):
        cv.validate(c)


def test_activation_that_differs_from_the_checkpoint_is_refused(tmp_path):
    c = importlib.import_module("configs.msrvtt").get_config()
    path = _hf_dir(tmp_path / "hf", text_heads=8, vision_heads=12)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        cfg[tower]["hidden_act"] = "gelu"  # OpenCLIP's
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    c.model.clip.checkpoint = path
    with pytest.raises(cv.ConfigError, match=r"--config\.model\.clip\.activation=gelu"):
        cv.check_inputs(c, "train", str(tmp_path))
    c.model.clip.activation = "gelu"
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="data_pipeline.build"):  # past the check
        cv.check_inputs(c, "train", str(tmp_path))


def test_a_mesh_the_devices_cannot_hold_is_a_config_error():
    # Before compile, one line at the command line (ConfigError); the multi-process case (a
    # process left without devices) is tests/test_launch.py's.
    c = _demo()
    c.mesh.data = 64
    with pytest.raises(cv.ConfigError, match=r"needs 64 devices"):
        cv.check_devices(c)
    c.mesh.data = -1
    cv.check_devices(c)  # all devices: fine
