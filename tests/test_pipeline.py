"""tf.data pipeline on a built synthetic dataset (12 train / 6 test clips, 5 captions each)."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import demo
from data_pipeline import build as build_lib
from data_pipeline import pipeline, synthetic, tables
from data_pipeline.sampling import FrameSampling
from ucofia_jax.models import tokenizer
from ucofia_jax.runtime import sharding

F, S, NW = 4, 32, 16


def _data_cfg(data_dir, expand=False, dataset="msrvtt", manual_dir=""):
    """``config.data`` of the demo, pointed at `data_dir` with this file's sampling."""
    d = demo.get_config().data
    d.update(
        dict(
            dataset=dataset,
            data_dir=data_dir,
            manual_dir=manual_dir,
            max_words=NW,
            max_frames=F,
            image_size=S,
            expand_sentences=expand,
        )
    )
    return d


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("raw"))
    synthetic.make_synthetic_dataset(raw, num_train=12, num_test=6, frame_size=32, seed=0)
    return raw


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, raw_dir):
    out = str(tmp_path_factory.mktemp("tfds"))
    build_lib.build(
        "msrvtt",
        manual_dir=raw_dir,
        data_dir=out,
        sampling=FrameSampling.from_config(_data_cfg(out)),
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    return out


@pytest.fixture(scope="module")
def train(data_dir):
    return pipeline.VideoTextData(
        _data_cfg(data_dir), split="train", process_index=0, process_count=1
    )


def _stack(batches, key):
    return np.stack([b[key] for b in batches])


def test_shapes_and_text_alignment(train):
    batches = list(train.train_batches(epoch=0, seed=0, global_batch=4))
    assert len(batches) == train.steps_per_epoch(4) == 3
    b = batches[0]
    assert b["input_ids"].shape == (4, NW) and b["input_ids"].dtype == np.int32
    assert b["input_mask"].shape == (4, NW) and b["input_mask"].dtype == np.int32
    assert b["frames"].shape == (4, F, S, S, 3) and b["frames"].dtype == np.uint8
    assert b["frame_mask"].shape == (4, F) and b["frame_mask"].dtype == np.int32
    assert b["video_index"].dtype == np.int32 and b["text_index"].dtype == np.int32
    # Each text belongs to its row's video, and the tokens are the tokens of that text.
    np.testing.assert_array_equal(train.text_to_video[b["text_index"]], b["video_index"])
    ids, _ = tokenizer.tokenize([train.texts[t] for t in b["text_index"]], NW)
    np.testing.assert_array_equal(b["input_ids"], ids)
    # Frames are the stored frames of the row's video.
    src = train.builder.as_data_source("train")
    for row, v in enumerate(b["video_index"]):
        np.testing.assert_array_equal(b["frames"][row], np.stack(src[int(v)]["frames"]))
    # One caption per video per epoch: 12 videos, 3 steps of 4, all different.
    vids = _stack(batches, "video_index").ravel()
    assert sorted(vids) == list(range(12))


def test_order_is_deterministic_per_seed_and_epoch(train):
    def order(epoch, seed):
        bs = list(train.train_batches(epoch=epoch, seed=seed, global_batch=4))
        return _stack(bs, "video_index"), _stack(bs, "text_index"), _stack(bs, "frames")

    v0, t0, f0 = order(0, 0)
    v0b, t0b, f0b = order(0, 0)
    np.testing.assert_array_equal(v0, v0b)
    np.testing.assert_array_equal(t0, t0b)
    np.testing.assert_array_equal(f0, f0b)
    v1, t1, _ = order(1, 0)
    assert not np.array_equal(t0, t1)  # new order and caption draw each epoch
    assert sorted(v1.ravel()) == list(range(12))
    vs, ts, _ = order(0, 1)
    assert not np.array_equal(t0, ts)


def test_resume_at_step_sees_the_same_batches(train):
    full = list(train.train_batches(epoch=2, seed=3, global_batch=4))
    resumed = list(train.train_batches(epoch=2, seed=3, global_batch=4, start_step=1))
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert list(train.train_batches(epoch=2, seed=3, global_batch=4, start_step=3)) == []
    with pytest.raises(ValueError, match="start_step"):
        next(train.train_batches(epoch=2, seed=3, global_batch=4, start_step=4))


def test_train_epochs_is_the_seeded_stream_per_epoch(train):
    epochs = train.train_epochs(seed=3, global_batch=4)
    assert epochs.steps_per_epoch == train.steps_per_epoch(4) == 3
    for epoch, start in ((0, 0), (2, 1)):
        want = list(train.train_batches(epoch=epoch, seed=3, global_batch=4, start_step=start))
        got = list(epochs.epoch(epoch, start))
        assert len(got) == len(want) == 3 - start
        for a, b in zip(got, want):
            for k in b:
                np.testing.assert_array_equal(a[k], b[k])


def test_two_processes_partition_every_global_batch(data_dir, train):
    single = list(train.train_batches(epoch=0, seed=0, global_batch=4))
    parts = []
    for p in range(2):
        d = pipeline.VideoTextData(
            _data_cfg(data_dir), split="train", process_index=p, process_count=2
        )
        parts.append(list(d.train_batches(epoch=0, seed=0, global_batch=4)))
    assert len(parts[0]) == len(parts[1]) == len(single)
    for s, a, b in zip(single, *parts):
        assert a["frames"].shape[0] == b["frames"].shape[0] == 2  # global batch // processes
        for k in s:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), s[k])
        assert not set(a["video_index"]) & set(b["video_index"])
    with pytest.raises(ValueError, match="divisible"):
        d3 = pipeline.VideoTextData(
            _data_cfg(data_dir), split="train", process_index=0, process_count=3
        )
        next(d3.train_batches(epoch=0, seed=0, global_batch=4))


def test_one_process_reads_every_row_on_any_mesh(data_dir, train):
    """With one process the mesh's rows are the whole batch, whatever the mesh (the
    2-process cases, where they differ, are in tests/test_mesh_batches.py)."""
    want = list(train.train_batches(epoch=1, seed=2, global_batch=4))
    for data, fsdp, model in ((1, 1, 4), (2, 2, 1), (4, 1, 1)):
        mesh = sharding.make_mesh(
            ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))
        )
        d = pipeline.VideoTextData(_data_cfg(data_dir), split="train", mesh=mesh)
        np.testing.assert_array_equal(d.rows(4), np.arange(4))
        got = list(d.train_batches(epoch=1, seed=2, global_batch=4))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            for k in b:
                np.testing.assert_array_equal(a[k], b[k])
        with pytest.raises(ValueError, match="process 1 holds no device"):
            pipeline.VideoTextData(
                _data_cfg(data_dir), split="train", mesh=mesh, process_index=1, process_count=2
            ).rows(4)


def test_plan_columns_and_block_rows():
    plan = np.arange(24).reshape(3, 8)
    np.testing.assert_array_equal(pipeline.block_rows(8, 1, 2), [4, 5, 6, 7])
    np.testing.assert_array_equal(pipeline.shard_plan(plan, 1, 2), plan[:, 4:])
    # a process's rows in process_rows order, e.g. blocks 0 and 2 of 4
    np.testing.assert_array_equal(
        pipeline.plan_columns(plan, np.array([0, 1, 4, 5])), plan[:, [0, 1, 4, 5]]
    )
    for bad in ([], [8], [-1]):
        with pytest.raises(ValueError, match="not columns of a global batch of 8"):
            pipeline.plan_columns(plan, np.array(bad, int))


def test_expand_sentences_uses_every_pair_once(data_dir):
    d = pipeline.VideoTextData(
        _data_cfg(data_dir, expand=True), split="train", process_index=0, process_count=1
    )
    assert d.num_texts == 60
    vplan, tplan = pipeline.train_plan(
        d.text_offsets, seed=0, epoch=0, global_batch=8, expand_sentences=True
    )
    assert vplan.shape == (7, 8)  # 60 pairs, drop_remainder
    vp, tp = pipeline.train_plan(
        d.text_offsets, seed=0, epoch=0, global_batch=4, expand_sentences=True
    )
    assert sorted(tp.ravel()) == list(range(60))
    np.testing.assert_array_equal(d.text_to_video[tp], vp)
    batches = list(d.train_batches(epoch=0, seed=0, global_batch=20))
    assert len(batches) == 3
    np.testing.assert_array_equal(_stack(batches, "text_index"), tp.reshape(3, 20))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_yields_every_item_once_with_padding(data_dir, process_count):
    seen_v, seen_t, nbatches = [], [], []
    for p in range(process_count):
        ev = pipeline.VideoTextData(
            _data_cfg(data_dir), split="test", process_index=p, process_count=process_count
        )
        assert ev.num_videos == 6 and ev.num_texts == 6  # MSR-VTT 1k-A: one text per video
        vb = list(ev.eval_video_batches(global_batch=4))
        tb = list(ev.eval_text_batches(global_batch=4))
        nbatches.append((len(vb), len(tb)))
        for b in vb:
            assert b["frames"].shape == (4 // process_count, F, S, S, 3)
            seen_v += list(b["video_index"][b["valid"] == 1])
            assert (b["valid"] == 0).sum() == 0 or (b["video_index"][b["valid"] == 0] == 0).all()
        for b in tb:
            assert b["input_ids"].shape == (4 // process_count, NW)
            seen_t += list(b["text_index"][b["valid"] == 1])
            np.testing.assert_array_equal(b["video_index"], ev.text_to_video[b["text_index"]])
    assert sorted(seen_v) == list(range(6))  # 6 videos in 2 global batches of 4: 2 padding rows
    assert sorted(seen_t) == list(range(6))
    assert len(set(nbatches)) == 1 and nbatches[0] == (2, 2)  # same step count on every process


def test_multi_sentence_text_stream_and_sk_bank(data_dir, train):
    # The training split holds 5 captions per video: every caption is its own query.
    tb = list(train.eval_text_batches(global_batch=8))
    valid = np.concatenate([b["valid"] for b in tb]).astype(bool)
    tidx = np.concatenate([b["text_index"] for b in tb])[valid]
    vidx = np.concatenate([b["video_index"] for b in tb])[valid]
    assert sorted(tidx) == list(range(60))
    assert np.bincount(vidx).tolist() == [5] * 12
    assert all(
        train.texts[t] in train.texts[train.text_offsets[v] : train.text_offsets[v + 1]]
        for t, v in zip(tidx, vidx)
    )
    bank = train.text_bank(7)
    assert bank["input_ids"].shape == (7, NW)
    assert len(set(bank["text_index"])) == 7
    np.testing.assert_array_equal(bank["text_index"], train.text_bank(7)["text_index"])
    assert train.text_bank(None)["input_ids"].shape == (60, NW)


def test_unbuilt_dataset_names_the_build_command(tmp_path, data_dir, raw_dir):
    msg = pipeline.dataset_problems(_data_cfg(str(tmp_path)))
    assert "the msrvtt dataset (msrvtt_f4_s32) is not built" in msg
    assert "config.data.manual_dir is not set" in msg
    assert (
        f"python -m data_pipeline.build --dataset=msrvtt --manual_dir=RAW "
        f"--data_dir={tmp_path} --max_frames=4 --image_size=32 --feature_framerate=1 "
        "--slice_framepos=2 --jpeg_quality=95" in msg
    )
    # Whether the raw files are complete says which step comes first.
    msg = pipeline.dataset_problems(_data_cfg(str(tmp_path), manual_dir=raw_dir))
    assert f"The raw files in config.data.manual_dir = {raw_dir!r} look complete." in msg
    assert f"--manual_dir={raw_dir} --data_dir={tmp_path}" in msg
    missing = str(tmp_path / "no_raw")
    msg = pipeline.dataset_problems(_data_cfg(str(tmp_path), manual_dir=missing))
    assert f"Raw files first (config.data.manual_dir): manual_dir {missing} does not exist" in msg
    with pytest.raises(Exception, match="python -m data_pipeline.build --dataset=msrvtt"):
        pipeline.VideoTextData(
            _data_cfg(str(tmp_path)), split="train", process_index=0, process_count=1
        )
    # The data_dir argument overrides config.data.data_dir, also in the message.
    with pytest.raises(Exception, match="not built in config.data.data_dir = '/nonexistent'"):
        pipeline.VideoTextData(
            _data_cfg(data_dir),
            split="train",
            data_dir="/nonexistent",
            process_index=0,
            process_count=1,
        )
    assert pipeline.dataset_problems(_data_cfg(data_dir)) == ""
    assert "no split 'train_7k'" in pipeline.dataset_problems(_data_cfg(data_dir), "train_7k")
    # MSR-VTT / VATEX / ActivityNet validate on their test files: 'val' and 'val_1' map to test.
    assert pipeline.resolve_split("val_1", ["train", "test"]) == "test"
    assert pipeline.resolve_split("val", ["train", "val", "test"]) == "val"


def _vatex_from_synthetic(tmp_path_factory):
    """The synthetic clips in VATEX layout: test videos keep all 5 captions (multi-sentence)."""
    raw = str(tmp_path_factory.mktemp("synth_for_vatex"))
    synthetic.make_synthetic_dataset(raw, num_train=8, num_test=6, frame_size=32, seed=1)
    vatex = str(tmp_path_factory.mktemp("vatex"))
    shutil.copytree(os.path.join(raw, "videos"), os.path.join(vatex, "videos"))
    with open(os.path.join(raw, "MSRVTT_data.json")) as f:
        data = json.load(f)
    caps = {}
    for s in data["sentences"]:
        caps.setdefault(s["video_id"], []).append(s["caption"])
    with open(os.path.join(vatex, "ref_captions.json"), "w") as f:
        json.dump(caps, f)
    for split, ids in (("train", range(8)), ("test", range(8, 14))):
        with open(os.path.join(vatex, f"{split}_list.txt"), "w") as f:
            f.write("".join(f"video{i}\n" for i in ids))
    return vatex, caps


def test_the_sampling_comes_from_the_config(tmp_path, data_dir, train, monkeypatch):
    """The pipeline reads the dataset of config.data's sampling, and the build command it
    prints for another sampling builds exactly that one."""
    assert train.sampling == FrameSampling.from_config(_data_cfg(data_dir))
    batch = next(iter(train.train_batches(epoch=0, seed=0, global_batch=4)))
    assert batch["frames"].shape[1:] == (F, S, S, 3) and batch["frame_mask"].shape[1:] == (F,)
    cfg = _data_cfg(data_dir)
    cfg.update(dict(max_frames=3, slice_framepos=0, jpeg_quality=80))
    msg = pipeline.dataset_problems(cfg)
    assert "(msrvtt_f3_s32_pos0_q80) is not built" in msg, msg
    command = next(line for line in msg.splitlines() if "python -m data_pipeline.build" in line)
    seen = []
    monkeypatch.setattr(build_lib, "build", lambda dataset, **kw: seen.append(kw["sampling"]))
    assert build_lib.main(command.split()[3:]) == 0
    assert seen == [FrameSampling.from_config(cfg)]


def test_multi_sentence_eval_on_vatex(tmp_path_factory):
    raw, caps = _vatex_from_synthetic(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("vatex_tfds"))
    summary = build_lib.build(
        "vatex",
        manual_dir=raw,
        data_dir=out,
        sampling=FrameSampling.from_config(_data_cfg(out, dataset="vatex")),
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    assert summary["written"] == {"train": 8, "test": 6}
    data = pipeline.VideoTextData(
        _data_cfg(out, dataset="vatex"), split="test", process_index=0, process_count=1
    )
    assert data.num_videos == 6 and data.num_texts == 30  # every caption is a query
    texts = list(data.eval_text_batches(global_batch=4))
    assert len(texts) == 8  # 30 texts in global batches of 4, last one padded
    valid = np.concatenate([b["valid"] for b in texts]).astype(bool)
    assert valid.sum() == 30
    tidx = np.concatenate([b["text_index"] for b in texts])[valid]
    vidx = np.concatenate([b["video_index"] for b in texts])[valid]
    assert sorted(tidx) == list(range(30))
    for t, v in zip(tidx, vidx):
        assert data.texts[t] in caps[data.video_ids[v]]
    videos = list(data.eval_video_batches(global_batch=4))
    vvalid = np.concatenate([b["valid"] for b in videos]).astype(bool)
    assert sorted(np.concatenate([b["video_index"] for b in videos])[vvalid]) == list(range(6))


def test_tables_sidecar_matches_the_records(data_dir, train):
    path = tables.tables_path(train.builder.data_dir, "train")
    assert os.path.exists(path)  # written by the build
    from_records = tables.read_tables(train._source)
    assert from_records.video_ids == train.video_ids
    assert from_records.texts == train.texts
    np.testing.assert_array_equal(from_records.text_offsets, train.text_offsets)
    # A stale sidecar (other record count) is ignored and rewritten.
    with open(path, "w") as f:
        json.dump({"num_records": 3, "video_ids": [], "captions": []}, f)
    again = tables.load_tables(train._source, train.builder.data_dir, "train")
    assert again.video_ids == train.video_ids
    with open(path) as f:
        assert json.load(f)["num_records"] == 12
