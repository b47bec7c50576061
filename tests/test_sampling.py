"""FrameSampling: one frozen frame-sampling spec, read from config.data (defaults only in
base_config), and what a wrong field says."""

import dataclasses

import pytest

from data_pipeline.sampling import FrameSampling
from ucofia_jax import config as config_lib


def test_base_config_gives_the_original_recipe():
    # The original's sampling (SPEC §11): 12 frames of 224 px at 1 fps, uniform slice; frames
    # stored as JPEG quality 95 (the quality every built dataset and search index used).
    s = FrameSampling.from_config(config_lib.base_config().data)
    assert s == FrameSampling(
        max_frames=12, image_size=224, feature_framerate=1, slice_framepos=2, jpeg_quality=95
    )
    assert s.to_dict() == {k: config_lib.base_config().data[k] for k in FrameSampling.field_names()}


def test_reads_any_mapping_and_is_frozen():
    d = dict(config_lib.base_config().data.to_dict(), max_frames=3, image_size=8)
    s = FrameSampling.from_config(d)
    assert (s.max_frames, s.image_size) == (3, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_frames = 4
    assert s.replace(max_frames=4).max_frames == 4 and s.max_frames == 3
    assert s.build_flags() == (
        "--max_frames=3 --image_size=8 --feature_framerate=1 --slice_framepos=2 --jpeg_quality=95"
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"max_frames": 0}, "config.data.max_frames must be >= 1"),
        ({"image_size": 2.5}, "config.data.image_size must be an integer"),
        ({"feature_framerate": 0}, "config.data.feature_framerate must be >= 1"),
        ({"slice_framepos": 3}, "config.data.slice_framepos must be one of"),
        ({"jpeg_quality": 101}, "config.data.jpeg_quality must be in 1..100"),
        ({"max_frames": True}, "config.data.max_frames must be an integer"),
    ],
)
def test_a_bad_field_names_its_config_key(change, message):
    d = dict(config_lib.base_config().data.to_dict(), **change)
    with pytest.raises(ValueError, match=message):
        FrameSampling.from_config(d)


def test_a_missing_key_is_named():
    d = config_lib.base_config().data.to_dict()
    del d["jpeg_quality"]
    with pytest.raises(
        ValueError, match=r"lacks the frame sampling key\(s\) config.data.jpeg_quality"
    ):
        FrameSampling.from_config(d)
