"""Faults in annotation files are loud: a stray quote, a field over several lines, repeated ids
(csv rows, list files, JSON keys) are each reported with the file and the line; `--strict`
lists every problem (not only the first) before any video is decoded; skip_report.txt counts
annotation problems; a captions pickle of shared references loads (or is refused) at once."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest

from data_pipeline import build as build_lib
from data_pipeline import builder as builder_lib
from data_pipeline import synthetic
from data_pipeline.datasets import get_reader, msvd
from data_pipeline.datasets._common import REASON_DUPLICATE, REASON_SPANS_LINES
from data_pipeline.records import SkipReport
from ucofia_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _videos(root, ids, ext=".mp4"):
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    for vid in ids:
        with open(os.path.join(root, "videos", vid + ext), "wb") as f:
            f.write(b"x")  # readers only check that the file exists


def _jsfusion(root, rows):
    path = os.path.join(root, "MSRVTT_JSFUSION_test.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("key,vid_key,video_id,sentence\n")
        for i, (vid, sentence) in enumerate(rows):
            f.write(f"ret{i},msr{vid[5:]},{vid},{sentence}\n")
    return path


def _ten_rows():
    return [(f"video{7000 + i}", f"a person does thing number {i}") for i in range(10)]


def test_msrvtt_stray_quote_in_row_3(tmp_path):
    """The issue's example: one stray quote in row 3 of a 10-row MSRVTT_JSFUSION_test.csv.
    Parsed as a whole the quote swallows the next 7 rows (3 records); here row 3 is reported
    and skipped, the span is reported, and the other 9 rows are kept."""
    root = str(tmp_path)
    rows = _ten_rows()
    rows[2] = (rows[2][0], '"a man is talking')  # row 3 = line 4 (after the header)
    path = _jsfusion(root, rows)
    _videos(root, [v for v, _ in rows])
    report = SkipReport()
    recs = get_reader("msrvtt")(root, "test", report=report)
    assert [r.video_id for r in recs] == [v for i, (v, _) in enumerate(rows) if i != 2]
    assert [r.captions for r in recs][:2] == [(rows[0][1],), (rows[1][1],)]
    got = {(e["file"], e["reason"]) for e in report}
    assert got == {(f"{path}:4-11", REASON_SPANS_LINES), (f"{path}:4", "unreadable annotation row")}
    span = next(e for e in report if e["reason"] == REASON_SPANS_LINES)
    # header + 3 records: what the old whole-file parse kept of the 10 rows
    assert "gives 4 rows for its 11 non-empty lines" in span["detail"], span
    with pytest.raises(DataError, match=rf"{path}:4-11: field spans lines"):
        get_reader("msrvtt")(root, "test", strict=True)


def test_field_with_a_newline_and_wrong_field_count(tmp_path):
    root = str(tmp_path)
    rows = _ten_rows()[:4]
    rows[1] = (rows[1][0], '"a caption over\ntwo lines"')
    rows[3] = (rows[3][0], "one,field,too many")
    path = _jsfusion(root, rows)
    _videos(root, [v for v, _ in rows])
    report = SkipReport()
    recs = get_reader("msrvtt")(root, "test", report=report)
    assert [r.video_id for r in recs] == [rows[0][0], rows[2][0]]
    where = sorted(e["file"] for e in report)
    # The span (lines 3-4), each half of it alone (3: open quote, 4: 1 field), line 6: 6 fields.
    assert where == sorted([f"{path}:3-4", f"{path}:3", f"{path}:4", f"{path}:6"]), where


def test_duplicate_ids_reported_with_line(tmp_path):
    root = str(tmp_path)
    rows = _ten_rows()[:4]
    rows[3] = rows[1]  # line 5 repeats line 3's video id
    path = _jsfusion(root, rows)
    _videos(root, [v for v, _ in rows])
    report = SkipReport()
    recs = get_reader("msrvtt")(root, "test", report=report)
    assert [r.video_id for r in recs] == [v for v, _ in rows[:3]]
    (e,) = list(report)
    assert (e["file"], e["reason"]) == (f"{path}:5", REASON_DUPLICATE)
    assert f"already at {path}:3" in e["detail"]


def test_duplicates_in_list_files_and_json_keys(tmp_path):
    root = str(tmp_path)
    # VATEX: a repeated id in the list file and a repeated key in ref_captions.json.
    with open(os.path.join(root, "test_list.txt"), "w") as f:
        f.write("vA\nvB\nvA\n")
    caps = '{\n "vA": ["a cat"],\n "vB": ["a dog"],\n "vB": ["a bird"]\n}\n'
    with open(os.path.join(root, "ref_captions.json"), "w") as f:
        f.write(caps)
    _videos(root, ["vA", "vB"])
    report = SkipReport()
    recs = get_reader("vatex")(root, "test", report=report)
    assert [(r.video_id, r.captions) for r in recs] == [("vA", ("a cat",)), ("vB", ("a bird",))]
    got = sorted((os.path.basename(e["file"]), e["reason"]) for e in report)
    assert got == [("ref_captions.json:4", REASON_DUPLICATE), ("test_list.txt:3", REASON_DUPLICATE)]
    # LSMDC keeps the last row of a repeated clip id (as the original) and reports the first.
    row = "{}\t0\t1\t0\t1\t{}\n"
    with open(os.path.join(root, "LSMDC16_annos_val.csv"), "w") as f:
        f.write(row.format("m_01", "first") + row.format("m_02", "x") + row.format("m_01", "last"))
    _videos(root, ["m_01", "m_02"], ext=".avi")
    report = SkipReport()
    recs = get_reader("lsmdc")(root, "val", report=report)
    assert {r.video_id: r.captions for r in recs} == {"m_01": ("last",), "m_02": ("x",)}
    (e,) = list(report)
    assert e["file"].endswith("LSMDC16_annos_val.csv:1") and e["reason"] == REASON_DUPLICATE


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    synthetic.make_synthetic_dataset(
        root, num_train=4, num_test=4, frame_size=16, num_seconds=2, fps=2, seed=0
    )
    return root


def _copy_with_faults(src, dst):
    """A stray quote in the 2nd test row (line 3: reported as the span 3-5 and as the line)
    and the first training id repeated at the end of the train list (line 6)."""
    shutil.copytree(src, dst)
    test_csv = os.path.join(dst, "MSRVTT_JSFUSION_test.csv")
    lines = open(test_csv, encoding="utf-8").read().splitlines()
    key, vkey, vid, sentence = lines[2].split(",", 3)
    lines[2] = f'{key},{vkey},{vid},"{sentence}'
    open(test_csv, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    train_csv = os.path.join(dst, "MSRVTT_train.9k.csv")
    with open(train_csv, "a", encoding="utf-8") as f:
        f.write(open(train_csv, encoding="utf-8").read().splitlines()[1] + "\n")
    return test_csv, train_csv


def test_strict_build_lists_every_problem(small_raw, tmp_path, capsys):
    raw = str(tmp_path / "raw")
    test_csv, train_csv = _copy_with_faults(small_raw, raw)
    out = str(tmp_path / "tfds")
    argv = [
        "--dataset=msrvtt",
        f"--manual_dir={raw}",
        f"--data_dir={out}",
        "--max_frames=2",
        "--image_size=16",
        "--workers=0",
        "--no_progress",
    ]
    rc = build_lib.main([*argv, "--strict"])
    err = capsys.readouterr().err
    assert rc == 2
    # Every problem of both splits, one per line, before anything was decoded.
    assert "--strict: 3 problem(s) in the annotations of msrvtt" in err, err
    assert f"{train_csv}:6: duplicate id" in err, err
    assert f"{test_csv}:3-5: field spans lines" in err, err
    assert f"{test_csv}:3: unreadable annotation row" in err, err
    root = os.path.join(out, builder_lib.BUILDER_NAME, "msrvtt_f2_s16")
    report = open(os.path.join(root, "skip_report.txt"), encoding="utf-8").read()
    assert report.startswith("# skipped: 3 ("), report
    assert not [n for n in os.listdir(root) if n.startswith(("1.0.0", "incomplete."))]

    # Without --strict the same files build; the summary and skip_report.txt count them.
    rc = build_lib.main(argv)
    text = capsys.readouterr().out
    assert rc == 0
    assert "wrote 7 clips (train 4, test 3)" in text, text
    assert "skipped: 3 (" in text and "3 of them annotation problems, 0 videos" in text, text
    with open(os.path.join(root, "skip_report.json")) as f:
        entries = json.load(f)["entries"]
    assert sorted(e["file"] for e in entries) == sorted(
        [f"{train_csv}:6", f"{test_csv}:3-5", f"{test_csv}:3"]
    )


def _shared_reference_pickle(levels: int) -> bytes:
    x = ["a"]
    for _ in range(levels):
        x = [x, x]  # each level doubles the paths to the leaf, not the objects
    return pickle.dumps({"vid0": [x]}, protocol=2)


def test_captions_pickle_of_shared_references_is_quick(tmp_path):
    """~300 bytes that hold 2**40 paths: the type check visits each object once, so the
    reader finishes at once (in a child process, so that a hang is a timeout, not a stuck
    suite)."""
    data = _shared_reference_pickle(40)
    assert len(data) < 400, len(data)
    root = str(tmp_path)
    with open(os.path.join(root, "raw-captions.pkl"), "wb") as f:
        f.write(data)
    with open(os.path.join(root, "test_list.txt"), "w") as f:
        f.write("vid0\n")
    _videos(root, ["vid0"], ext=".avi")
    code = textwrap.dedent(
        """
        import sys, time
        from data_pipeline.datasets import msvd
        from data_pipeline.records import SkipReport
        from ucofia_jax.errors import DataError
        t0 = time.perf_counter()
        report = SkipReport()
        try:
            recs = msvd.read_split(sys.argv[1], "test", report=report)
            print("records", len(recs), "skipped", len(report))
        except DataError as e:
            print("refused", e)
        print("seconds", time.perf_counter() - t0)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert float(lines[-1].split()[1]) < 1.0, lines
    # The nested lists are not token lists: the caption and then the video are reported.
    assert lines[0] == "records 0 skipped 2", lines


def test_captions_pickle_bounds(tmp_path, monkeypatch):
    path = str(tmp_path / "raw-captions.pkl")
    loop = []
    loop.append(loop)  # a list that contains itself: visited once
    with open(path, "wb") as f:
        pickle.dump({"v": [loop]}, f, protocol=2)
    assert msvd.load_captions_pickle(path)["v"][0] is not None
    monkeypatch.setattr(msvd, "MAX_OBJECTS", 5)
    with open(path, "wb") as f:
        pickle.dump({"v": [["a", "b", "c"], ["d", "e"]]}, f, protocol=2)
    with pytest.raises(DataError, match=r"raw-captions\.pkl: more than 5 objects"):
        msvd.load_captions_pickle(path)
    monkeypatch.setattr(msvd, "MAX_PICKLE_BYTES", 10)
    with pytest.raises(DataError, match=r"raw-captions\.pkl: \d+ bytes, more than the 10"):
        msvd.load_captions_pickle(path)
