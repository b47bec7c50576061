"""One identity per content, one writer per index, and what ``index`` may read.

* The content hash is BLAKE2b of the whole file read in chunks; the row key is the content
  hash (+ the window's start), so identical files at two paths get identical keys and
  features, and ``touch`` re-encodes nothing (only size / mtime are updated).
* The plan hashes only files whose size or mtime changed; rows of an older version (no
  content hash) and duplicate rows (one path and start twice) are rewritten.
* The writer lease refuses a second ``index`` on the same index with one line (exit 2).
* A symlink to a file or folder outside the indexed folder is skipped with a reason unless
  ``follow_symlinks``.
* ``export`` carries content_hash / start / end / duration, writes 0644 under umask 022.

Wrong variants each equality check catches (run by hand, see the report): the hash of the
first chunk only (a change past 1 MiB); the selection noise keyed by the path (the copies'
features differ); ``touch`` treated as a change (a re-encode is counted); the lease taken
shared (a second writer gets in).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import time

import av
import numpy as np
import pyarrow as pa
import pytest
from _search_fixtures import make_clips, save_workdir, search_config
from safetensors.numpy import load_file

from data_pipeline import video as video_lib
from data_pipeline.records import SkipReport
from ucofia_jax.errors import IndexingError
from ucofia_jax.search import __main__ as cli
from ucofia_jax.search import decoding, export, indexer
from ucofia_jax.search.index import encode_videos
from ucofia_jax.search.source import ModelSource, load_model
from ucofia_jax.search.store import VIDEOS, Store, row_id_for, writer_lease

FEATURES = ("vector", "frames", "pixels", "mask")

# =========================================================================== fast units


def test_content_hash_is_blake2b_of_every_byte(tmp_path):
    data = os.urandom(2 * decoding.HASH_CHUNK + 123)
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, in the last chunk
    want = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert decoding.content_hash(str(a)) == decoding.content_hash(str(b)) == want
    assert decoding.content_hash(str(c)) != want


def test_row_keys_come_from_content_and_start():
    h = "0123456789abcdef0123456789abcdef"
    assert row_id_for(h, None) == hashlib.sha1(h.encode()).hexdigest()[:16]
    assert row_id_for(h, 4.0) == hashlib.sha1(f"{h}:4.0".encode()).hexdigest()[:16]
    assert row_id_for(h, 4) == row_id_for(h, 4.0) != row_id_for(h, 2.0) != row_id_for(h, None)


class _FakeStore:
    def __init__(self, rows):  # (path, size, mtime_ns, content_hash, start)
        self.rows = rows

    def catalogue(self):
        names = ("path", "size", "mtime_ns", "content_hash", "start")
        return pa.table({n: [r[i] for r in self.rows] for i, n in enumerate(names)})


def test_plan_hashes_only_files_whose_stat_changed():
    F = indexer.FileInfo
    files = [
        F("same.mp4", "/same", 1, 10),
        F("touched.mp4", "/touched", 2, 99),
        F("edited.mp4", "/edited", 3, 99),
        F("old.mp4", "/old", 4, 40),
        F("dup.mp4", "/dup", 5, 50),
        F("long.mp4", "/long", 6, 60),
        F("new.mp4", "/new", 7, 70),
    ]
    store = _FakeStore(
        [
            ("same.mp4", 1, 10, "h-same", None),
            ("touched.mp4", 2, 20, "h-touched", None),
            ("edited.mp4", 3, 30, "h-edited", None),
            ("old.mp4", 4, 40, None, None),  # written before content hashes
            ("dup.mp4", 5, 50, "h-dup", None),
            ("dup.mp4", 5, 50, "h-dup", None),  # the same row twice
            ("long.mp4", 6, 60, "h-long", 0.0),
            ("long.mp4", 6, 60, "h-long", 6.0),  # two windows: not duplicates
            ("gone.mp4", 8, 80, "h-gone", None),
        ]
    )
    hashed = []

    def hash_file(path):
        hashed.append(path)
        return {"/touched": "h-touched", "/edited": "h-other"}[path]

    plan = indexer.make_plan(store, files, hash_file=hash_file)
    assert sorted(hashed) == ["/edited", "/touched"]
    assert [f.rel for f in plan.new] == ["new.mp4"]
    assert sorted(f.rel for f in plan.changed) == ["dup.mp4", "edited.mp4", "old.mp4"]
    assert [f.rel for f in plan.touched] == ["touched.mp4"]
    assert plan.unchanged == 3 and plan.deleted == ["gone.mp4"]
    assert plan.hashes == {"touched.mp4": "h-touched", "edited.mp4": "h-other"}


def test_scan_skips_symlinks_to_outside_the_folder(tmp_path):
    root, outside = tmp_path / "videos", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    (outside / "dir").mkdir(parents=True)
    for p in (root / "a.mp4", root / "sub" / "b.mp4", outside / "x.mp4", outside / "dir" / "y.mp4"):
        p.write_bytes(b"x")
    (root / "inside_link.mp4").symlink_to(root / "sub" / "b.mp4")
    (root / "outside_link.mp4").symlink_to(outside / "x.mp4")
    (root / "outside_dir").symlink_to(outside / "dir")
    (root / "broken.mp4").symlink_to(tmp_path / "nothing.mp4")

    skipped = SkipReport()
    got = [f.rel for f in indexer.scan(root, skipped=skipped)]
    assert got == ["a.mp4", "inside_link.mp4", "sub/b.mp4"]
    reasons = {e["file"]: e["reason"] for e in skipped}
    assert reasons == {
        "outside_link.mp4": indexer.OUTSIDE_LINK,
        "outside_dir/": indexer.OUTSIDE_LINK,
        "broken.mp4": "broken symlink",
    }
    assert reasons["outside_link.mp4"] == "symlink to outside the indexed folder"

    skipped = SkipReport()
    got = [f.rel for f in indexer.scan(root, follow_symlinks=True, skipped=skipped)]
    assert got == ["a.mp4", "inside_link.mp4", "outside_dir/y.mp4", "outside_link.mp4", "sub/b.mp4"]
    assert [e["file"] for e in skipped] == ["broken.mp4"]


def test_writer_lease_admits_one_writer(tmp_path):
    idx = tmp_path / "idx"
    with writer_lease(idx):
        with pytest.raises(IndexingError, match=r"another `index` is writing"):
            with writer_lease(idx):
                pass
        # What another process sees: the lock file is held exclusively.
        fd = os.open(idx / "writer.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with writer_lease(idx):  # released with its context
        pass
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a ucofia search index"):
        with writer_lease(tmp_path / "other"):  # a user's folder is not touched
            pass
    assert not (tmp_path / "other" / "writer.lock").exists()


# =========================================================================== with a model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    model = load_model(ModelSource(workdir=save_workdir(tmp / "run", search_config())))
    clips = tmp / "clips"
    make_clips(clips, 3, seed=5)
    (clips / "sub").mkdir()
    shutil.copy2(clips / "video0.mp4", clips / "sub" / "copy.mp4")
    frames = []
    for i in range(3):
        with av.open(str(clips / f"video{i}.mp4")) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    video_lib.write_video(str(clips / "long.mp4"), frames, 2)  # 6 s: 5 windows of 2 s
    return {"model": model, "clips": clips, "tmp": tmp}


def _build(setup, clips, idx):
    return indexer.build_index(clips, idx, setup["model"], workers=0, batch_size=4, progress=False)


def _rows(idx) -> dict:
    rows = Store.open(idx).table.to_arrow().to_pylist()
    return {(r["path"], r["start"]): r for r in rows}


@pytest.mark.slow
def test_identical_files_identical_features_and_touch_changes_nothing(setup, tmp_path):
    clips = tmp_path / "clips"
    shutil.copytree(setup["clips"], clips)
    s = _build(setup, clips, tmp_path / "idx")
    assert (s.indexed, s.total, s.rows) == (5, 5, 4 + 5)
    before = _rows(tmp_path / "idx")
    a, b = before[("video0.mp4", None)], before[("sub/copy.mp4", None)]
    assert (
        a["content_hash"] == b["content_hash"] == decoding.content_hash(str(clips / "video0.mp4"))
    )
    assert a["video_id"] == b["video_id"] == row_id_for(a["content_hash"], None)
    for key in FEATURES:
        assert a[key] == b[key], key
    # The Python API gives the same features (keyed by content, wherever the file lies).
    again = encode_videos([clips / "sub" / "copy.mp4"], setup["model"])
    np.testing.assert_allclose(
        np.asarray(a["vector"], np.float32),
        again["vector"][0],
        atol=5e-3,
        rtol=0,  # float16 storage (test_search.F16_TOL)
    )

    touched = clips / "video0.mp4"
    os.utime(touched, ns=(time.time_ns(), touched.stat().st_mtime_ns + 10**9))
    s = _build(setup, clips, tmp_path / "idx")
    assert (s.indexed, s.changed, s.unchanged, s.removed) == (0, 0, 5, 0)
    assert s.touched_files == ["video0.mp4"]
    assert "same content, new time stamp: video0.mp4" in "\n".join(s.lines())
    after = _rows(tmp_path / "idx")
    assert after.keys() == before.keys()
    for key, row in after.items():
        old = dict(before[key])
        if key == ("video0.mp4", None):
            old["mtime_ns"] = touched.stat().st_mtime_ns
        assert row == old, key

    # Other content at the same path: re-encoded, named as changed.
    shutil.copy2(clips / "video1.mp4", clips / "video2.mp4")
    os.utime(clips / "video2.mp4", ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    s = _build(setup, clips, tmp_path / "idx")
    assert (s.indexed, s.changed, s.changed_files) == (1, 1, ["video2.mp4"])
    rows = _rows(tmp_path / "idx")
    assert rows[("video2.mp4", None)]["content_hash"] == rows[("video1.mp4", None)]["content_hash"]


@pytest.mark.slow
def test_duplicate_and_old_format_rows_are_rewritten(setup, tmp_path):
    idx = tmp_path / "idx"
    _build(setup, setup["clips"], idx)
    good = _rows(idx)
    store = Store.open(idx)
    table = store.table.to_arrow()
    # Rows an earlier version left: the same file twice (concurrent runs before the lease).
    first = table.filter(pa.compute.equal(table.column("path"), "video1.mp4"))
    store.table.add(first)
    assert Store.open(idx).catalogue().column("path").to_pylist().count("video1.mp4") == 2
    s = _build(setup, setup["clips"], idx)
    assert s.changed_files == ["video1.mp4"] and s.rows == len(good)
    cat = Store.open(idx).catalogue().to_pydict()
    pairs = list(zip(cat["path"], cat["start"]))
    assert len(pairs) == len(set(pairs)) == len(good)

    # An index written before content_hash / duration: opens, exports, then is migrated.
    old = table.drop_columns(["content_hash", "duration"])
    store.db.create_table(VIDEOS, old, mode="overwrite")
    cat = Store.open(idx).catalogue().to_pydict()
    assert set(cat["content_hash"]) == {None} and set(cat["duration"]) == {None}
    manifest = export.export(Store.open(idx), tmp_path / "feats")
    assert set(manifest["shards"][0]["content_hash"]) == {None}
    s = _build(setup, setup["clips"], idx)
    assert s.indexed == 5 and s.rows == len(good)
    migrated = _rows(idx)
    assert migrated.keys() == good.keys()
    for key, row in migrated.items():
        assert row["content_hash"] == good[key]["content_hash"], key
        assert row["video_id"] == good[key]["video_id"] and row["duration"] is not None


@pytest.mark.slow
def test_a_second_index_on_the_same_index_is_refused_with_one_line(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    workdir = str(setup["tmp"] / "run")
    args = ["index", "--videos", str(setup["clips"]), "--index", str(idx), "--workdir", workdir]
    with writer_lease(idx):  # another run holds it (flock: per open file, so also in-process)
        code = cli.main([*args, "--no_progress", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {idx.resolve()}: another `index` is writing"), err
    assert not Store.exists(idx)


@pytest.mark.slow
def test_export_carries_moments_and_is_readable_by_others(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    _build(setup, setup["clips"], idx)
    old_umask = os.umask(0o022)
    try:
        assert cli.main(["export", "--index", str(idx), "--out", str(tmp_path / "feats")]) == 0
    finally:
        os.umask(old_umask)
    assert capsys.readouterr().out.strip() == (
        f"wrote 9 rows (5 videos) in 1 shard to {tmp_path / 'feats'}"
    )
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    for name in ("manifest.json", "shard-00000.safetensors"):
        assert stat.S_IMODE((tmp_path / "feats" / name).stat().st_mode) == 0o644, name
    stored = _rows(idx)
    (shard,) = manifest["shards"]
    tensors = load_file(str(tmp_path / "feats" / shard["file"]))
    for i, path in enumerate(shard["path"]):
        row = stored[(path, shard["start"][i])]
        for key in ("video_id", "content_hash", "end", "duration"):
            assert shard[key][i] == row[key], key
        np.testing.assert_array_equal(tensors["vector"][i], np.asarray(row["vector"], np.float16))
    assert sorted(s for p, s in zip(shard["path"], shard["start"]) if p == "long.mp4") == [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    assert manifest["window"] == {"seconds": 2.0, "stride": 1.0}
    assert export.plural(1, "shard") == "1 shard" and export.plural(2, "shard") == "2 shards"
