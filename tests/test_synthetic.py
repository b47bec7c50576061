"""Synthetic dataset: deterministic per seed, MSR-VTT format, decodable, distinguishable."""
import csv
import filecmp
import json
import os

import numpy as np

from data_pipeline import synthetic
from data_pipeline.datasets import get_reader
from data_pipeline.records import SkipReport
from data_pipeline.video import decode_clip


def _make(path, seed=0):
  return synthetic.make_synthetic_dataset(str(path), num_train=12, num_test=8, frame_size=32,
                                          num_seconds=3, fps=4, seed=seed)


def _files(d):
  return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_deterministic_per_seed(tmp_path):
  a, b, c = _make(tmp_path / "a"), _make(tmp_path / "b"), _make(tmp_path / "c", seed=1)
  assert _files(a) == _files(b)
  for f in _files(a):
    assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
  ja = json.load(open(os.path.join(a, "MSRVTT_data.json")))
  jc = json.load(open(os.path.join(c, "MSRVTT_data.json")))
  assert [s["caption"] for s in ja["sentences"]] != [s["caption"] for s in jc["sentences"]]


def test_msrvtt_format_and_reader(tmp_path):
  d = _make(tmp_path / "d")
  data = json.load(open(os.path.join(d, "MSRVTT_data.json")))
  assert {"videos", "sentences"} <= set(data)
  assert {"video_id", "caption", "sen_id"} <= set(data["sentences"][0])
  with open(os.path.join(d, "MSRVTT_JSFUSION_test.csv")) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["key", "vid_key", "video_id", "sentence"] and len(rows) == 8
  report = SkipReport()
  train = get_reader("msrvtt")(d, "train", report=report)
  test = get_reader("msrvtt")(d, "test", report=report)
  assert len(report) == 0
  assert len(train) == 12 and all(len(r.captions) == 5 for r in train)
  assert len(test) == 8 and all(len(r.captions) == 1 for r in test)
  assert not {r.video_id for r in train} & {r.video_id for r in test}
  assert len(get_reader("msrvtt")(d, "train", expand_sentences=True, report=report)) == 60
  # Test clips are told apart by their (canonical) captions: all distinct.
  assert len({r.captions[0] for r in test}) == len(test)


def test_videos_decode_and_move(tmp_path):
  d = _make(tmp_path / "d")
  recs = get_reader("msrvtt")(d, "train", report=SkipReport())
  for r in recs[:4]:
    frames, mask = decode_clip(r.video_path, max_frames=6, image_size=32)
    # 3 s at 4 fps -> the original 1 fps rule takes frames 0, 4, 8.
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0])
    # Every caption describes a change (move / appear / disappear / recolour).
    assert np.abs(frames[0].astype(int) - frames[2].astype(int)).max() > 60, r.captions[0]


def test_compositional_captions():
  rng = np.random.default_rng(0)
  scene = {"background": "green", "objects": [
      {"shape": "circle", "colour": "red", "event": "left", "new_colour": None},
      {"shape": "square", "colour": "blue", "event": "appears", "new_colour": None}]}
  caps = synthetic.captions_for(scene, 5)
  assert caps[0] == "a red circle moves left while a blue square appears on a green background"
  assert len(set(caps)) == 5
  frames = synthetic.render(scene, frame_size=32, num_frames=8, rng=rng)
  assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8


def test_cli(tmp_path):
  synthetic.main(["--out", str(tmp_path / "cli"), "--num_train", "3", "--num_test", "2",
                  "--frame_size", "16", "--num_seconds", "2"])
  assert len(os.listdir(tmp_path / "cli" / "videos")) == 5
