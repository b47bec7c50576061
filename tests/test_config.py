"""Every shipped config validates; bad keys / values are rejected naming the key; missing
inputs fail with what to do. No model is built or compiled here."""

import importlib

import pytest

from data_pipeline import builder
from ucofia_jax import config as cv
from ucofia_jax.kernels import native

CONFIGS = ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "vatex", "demo")


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
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.manual_dir = str(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match=r"python -m data_pipeline\.build --dataset=msvd"):
        cv.check_inputs(c, "train", str(tmp_path))
