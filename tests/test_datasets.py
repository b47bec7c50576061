"""Annotation readers on small files in the exact original formats, with bad rows."""

import json
import os
import pickle

import pytest

from data_pipeline.datasets import MODULES, READERS, get_reader
from data_pipeline.datasets import _common as C
from data_pipeline.records import ClipRecord, DataError, SkipReport


def _videos(root, names, sub="videos"):
    d = os.path.join(root, sub)
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(d, n)), exist_ok=True)
        with open(os.path.join(d, n), "wb") as f:
            f.write(b"\0")  # readers only resolve paths; decoding is tested in test_video.py


def _write(path, data: bytes | str):
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _by_id(records):
    return {r.video_id: r for r in records}


# ----------------------------------------------------------------------------- MSR-VTT
def _msrvtt(root):
    sentences = [
        {"video_id": "video0", "caption": "a man sings", "sen_id": 0},
        {"video_id": "video0", "caption": " a man  is singing ", "sen_id": 1},
        {"video_id": "video1", "caption": "a cat", "sen_id": 2},
        {"video_id": "video1", "caption": "   ", "sen_id": 3},  # empty caption
        {"video_id": "video2", "caption": "BADTEXT", "sen_id": 4},  # non-UTF-8
        {"video_id": "video3", "caption": "no file for me", "sen_id": 5},  # missing video
        {"video_id": "video1", "sen_id": 6},  # unreadable row
    ]
    raw = json.dumps({"videos": [], "sentences": sentences}).encode()
    _write(os.path.join(root, "MSRVTT_data.json"), raw.replace(b"BADTEXT", b"caf\xe9 \xff"))
    _write(
        os.path.join(root, "MSRVTT_train.9k.csv"),
        "video_id\nvideo0\nvideo1\nvideo2\nvideo3\nvideo9\n",
    )
    _write(os.path.join(root, "MSRVTT_train.7k.csv"), "video_id\nvideo0\n")
    _write(
        os.path.join(root, "MSRVTT_JSFUSION_test.csv"),
        "key,vid_key,video_id,sentence\nret0,msr5,video5,a dog runs\n"
        'ret1,msr6,video6,"a ""quoted, comma"" caption"\nret2,msr7,video7\n',
    )
    _videos(root, ["video0.mp4", "video1.webm", "video2.mp4", "video5.mkv", "video6.avi"])


def test_msrvtt(tmp_path):
    _msrvtt(tmp_path)
    rep = SkipReport()
    recs = get_reader("msrvtt")(str(tmp_path), "train", report=rep)
    by = _by_id(recs)
    assert set(by) == {"video0", "video1"}
    assert by["video0"].captions == ("a man sings", "a man is singing")
    assert by["video1"].video_path.endswith("video1.webm")
    assert by["video0"].start is None and by["video0"].split == "train"
    assert rep.counts() == {
        "empty caption": 1,
        "non-UTF-8 text": 1,
        "unreadable annotation row": 1,
        "missing video": 1,
        "no annotation": 2,
    }  # video9, and video2 (its only caption was bad)
    assert any(f.endswith("MSRVTT_train.9k.csv:6") for f in rep.files("no annotation"))
    assert rep.files("missing video")[0].endswith(os.path.join("videos", "video3"))
    expanded = get_reader("msrvtt")(
        str(tmp_path), "train", expand_sentences=True, report=SkipReport()
    )
    assert [r.captions for r in expanded] == [("a man sings",), ("a man is singing",), ("a cat",)]
    assert len(get_reader("msrvtt")(str(tmp_path), "train_7k", report=SkipReport())) == 1
    rep = SkipReport()
    test = get_reader("msrvtt")(str(tmp_path), "test", report=rep)
    assert [(r.video_id, r.captions) for r in test] == [
        ("video5", ("a dog runs",)),
        ("video6", ('a "quoted, comma" caption',)),
    ]
    assert rep.counts() == {"unreadable annotation row": 1}


def test_msrvtt_strict_and_missing_files(tmp_path):
    _msrvtt(tmp_path)
    with pytest.raises(DataError, match="MSRVTT_data.json"):
        get_reader("msrvtt")(str(tmp_path), "train", strict=True)
    with pytest.raises(DataError, match="MSRVTT_JSFUSION_test.csv:4"):
        get_reader("msrvtt")(str(tmp_path), "test", strict=True)
    os.remove(tmp_path / "MSRVTT_train.9k.csv")
    with pytest.raises(DataError, match=r"MSRVTT_train\.9k\.csv not found"):
        get_reader("msrvtt")(str(tmp_path), "train")
    with pytest.raises(DataError, match="video folder"):
        get_reader("msrvtt")(str(tmp_path), "test", video_dir=str(tmp_path / "nope"))


def test_custom_video_dir(tmp_path):
    _msrvtt(tmp_path)
    os.rename(tmp_path / "videos", tmp_path / "elsewhere")
    recs = get_reader("msrvtt")(
        str(tmp_path), "test", video_dir=str(tmp_path / "elsewhere"), report=SkipReport()
    )
    assert len(recs) == 2 and "elsewhere" in recs[0].video_path


# -------------------------------------------------------------------------------- MSVD
def _msvd(root):
    caps = {
        "vidA": [["a", "man", "runs"], ["someone", "is", "running"]],
        "vidB": [["a", "cat"], []],  # second caption empty
        "vidC": [["no", "video"]],
    }
    _write(os.path.join(root, "raw-captions.pkl"), pickle.dumps(caps))
    _write(os.path.join(root, "train_list.txt"), "vidA\nvidB\nvidC\nvidZ\n")
    _write(os.path.join(root, "val_list.txt"), "vidA\n")
    _write(os.path.join(root, "test_list.txt"), "vidB\n\xff\n".encode("latin-1"))
    _videos(root, ["vidA.avi", "vidB.mp4"])


def test_msvd(tmp_path):
    _msvd(tmp_path)
    rep = SkipReport()
    recs = get_reader("msvd")(str(tmp_path), "train", report=rep)
    by = _by_id(recs)
    assert by["vidA"].captions == ("a man runs", "someone is running")
    assert by["vidB"].captions == ("a cat",)
    assert rep.counts() == {"no annotation": 1, "empty caption": 1, "missing video": 1}
    assert (
        len(get_reader("msvd")(str(tmp_path), "train", expand_sentences=True, report=SkipReport()))
        == 3
    )
    rep = SkipReport()
    assert [r.video_id for r in get_reader("msvd")(str(tmp_path), "test", report=rep)] == ["vidB"]
    assert rep.counts() == {"non-UTF-8 text": 1, "empty caption": 1}
    assert rep.files("non-UTF-8 text")[0].endswith("test_list.txt:2")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_MARKER"],))


def test_msvd_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    _msvd(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    _write(os.path.join(tmp_path, "raw-captions.pkl"), pickle.dumps({"vidA": _Evil()}))
    with pytest.raises(
        DataError, match=r"raw-captions\.pkl: refusing to unpickle (posix|os)\.system"
    ):
        get_reader("msvd")(str(tmp_path), "train", report=SkipReport())
    assert not marker.exists()
    _write(os.path.join(tmp_path, "raw-captions.pkl"), pickle.dumps({"vidA": {1, 2}}))
    with pytest.raises(DataError, match="raw-captions.pkl: .*set"):
        get_reader("msvd")(str(tmp_path), "train", report=SkipReport())
    _write(os.path.join(tmp_path, "raw-captions.pkl"), b"not a pickle")
    with pytest.raises(DataError, match="cannot read pickle"):
        get_reader("msvd")(str(tmp_path), "train", report=SkipReport())


# ------------------------------------------------------------------------------- LSMDC
def test_lsmdc(tmp_path):
    rows = [
        '1004_Juno_00.00.32.849-00.00.38.501\t00.00.32.849\t00.00.38.501\t00.00.32.849\t00.00.38.501\tSOMEONE looks at the "test\n',
        "1004_Juno_00.00.40.000-00.00.41.000\t00.00.40.000\t00.00.41.000\t00.00.40.000\t00.00.41.000\tShe smiles.\n",
        "1004_Juno_00.01.00.000-00.01.02.000\t00.01.00.000\t00.01.02.000\t00.01.00.000\tmissing a field\n",
        "1004_Juno_00.02.00.000-00.02.02.000\t0\t0\t0\t0\t \n",
        "1004_Juno_00.03.00.000-00.03.02.000\t0\t0\t0\t0\tno video here\n",
    ]
    _write(tmp_path / "LSMDC16_annos_training.csv", "".join(rows))
    _videos(
        tmp_path,
        [
            "1004_Juno/1004_Juno_00.00.32.849-00.00.38.501.avi",
            "1004_Juno_00.00.40.000-00.00.41.000.mp4",
            "1004_Juno_00.02.00.000-00.02.02.000.avi",
        ],
    )
    rep = SkipReport()
    recs = get_reader("lsmdc")(str(tmp_path), "train", report=rep)
    assert [r.captions for r in recs] == [('SOMEONE looks at the "test',), ("She smiles.",)]
    assert recs[0].video_path.endswith(
        os.path.join("1004_Juno", "1004_Juno_00.00.32.849-00.00.38.501.avi")
    )
    assert recs[0].start is None and recs[0].end is None
    assert rep.counts() == {"unreadable annotation row": 1, "empty caption": 1, "missing video": 1}
    with pytest.raises(DataError, match=r"LSMDC16_annos_training\.csv:3"):
        get_reader("lsmdc")(str(tmp_path), "train", strict=True)
    with pytest.raises(DataError, match="LSMDC16_annos_val.csv not found"):
        get_reader("lsmdc")(str(tmp_path), "val")


# ------------------------------------------------------------------------- ActivityNet
def test_activitynet(tmp_path):
    ann = {
        "v_AAA": {
            "duration": 82.7,
            "timestamps": [[0, 5], [5, 9]],
            "sentences": ["A man enters. ", " He sits down."],
        },
        "v_BBB": {"duration": 10.0, "timestamps": [[0, 1]], "sentences": ["Kids play."]},
        "v_CCC": {"duration": 10.0, "sentences": ["", " "]},
        "v_DDD": {"duration": 10.0},
        "v_EEE": {"duration": 3.0, "sentences": ["no file"]},
    }
    _write(tmp_path / "train.json", json.dumps(ann))
    _write(
        tmp_path / "train_ids.json",
        json.dumps(["v_AAA", "v_BBB", "v_CCC", "v_DDD", "v_EEE", "v_ZZZ"]),
    )
    _write(tmp_path / "val_1.json", json.dumps({"v_BBB": ann["v_BBB"]}))
    _videos(tmp_path, ["AAA.mp4", "v_BBB.mkv", "CCC.mp4"])
    rep = SkipReport()
    recs = get_reader("activitynet")(str(tmp_path), "train", report=rep)
    by = _by_id(recs)
    assert set(by) == {"AAA", "BBB"}
    assert by["AAA"].captions == ("A man enters. He sits down.",)
    assert by["BBB"].video_path.endswith("v_BBB.mkv")
    assert by["AAA"].start is None and by["AAA"].end is None
    assert rep.counts() == {
        "empty caption": 2,
        "no annotation": 2,  # v_ZZZ, and v_CCC
        "unreadable annotation row": 1,
        "missing video": 1,
    }
    # Each step in turn: the ids list; each video's entry, then its sentences; the files.
    assert [(os.path.basename(e["file"]), e["reason"]) for e in rep] == [
        ("train_ids.json[5]", "no annotation"),
        ("train.json[v_CCC].sentences[0]", "empty caption"),
        ("train.json[v_CCC].sentences[1]", "empty caption"),
        ("train.json[v_DDD]", "unreadable annotation row"),
        ("CCC.mp4", "no annotation"),
        ("EEE", "missing video"),
    ]
    # No val_ids.json: the json keys are the split; test is val_1 as in the original.
    test = get_reader("activitynet")(str(tmp_path), "test", report=SkipReport())
    assert [(r.video_id, r.split) for r in test] == [("BBB", "test")]


# ------------------------------------------------------------------------------ DiDeMo
def test_didemo(tmp_path):
    vids = ["111@N00_1_abc.mov", "222@N00_2_def.mp4", "333@N00_3_ghi.mov", "444@N00_4.mov"]
    data = [
        {"video": vids[0], "description": "a dog jumps", "times": [[0, 0], [0, 1]]},
        {"video": vids[1], "description": "the car stops", "times": [[2, 3]]},
        {"video": vids[0], "description": "the dog lands", "times": [[1, 1]]},
        {"video": vids[2], "description": "nobody has this file", "times": [[0, 0]]},
        {"description": "no video key"},
    ]
    _write(tmp_path / "train_data.json", json.dumps(data))
    _write(tmp_path / "train_list.txt", "\n".join(vids) + "\n")
    _videos(tmp_path, [vids[0], "222@N00_2_def.webm"])  # second: converted, extension changed
    rep = SkipReport()
    recs = get_reader("didemo")(str(tmp_path), "train", report=rep)
    by = _by_id(recs)
    assert by[vids[0]].captions == ("a dog jumps the dog lands",)
    assert by[vids[0]].video_path.endswith(vids[0])
    assert by[vids[1]].video_path.endswith("222@N00_2_def.webm")
    assert (by[vids[0]].start, by[vids[0]].end) == (0.0, 31.0)
    assert rep.counts() == {"unreadable annotation row": 1, "missing video": 1, "no annotation": 1}
    with pytest.raises(DataError, match=r"train_data\.json\[4\]"):
        get_reader("didemo")(str(tmp_path), "train", strict=True)


# ------------------------------------------------------------------------------- VATEX
def test_vatex(tmp_path):
    caps = {
        "Ab_000001_000011": ["A person cooks.", "Someone is cooking food."],
        "Cd_000002_000012": ["A horse runs.", 5],
        "Ef_000003_000013": "not a list",
    }
    _write(tmp_path / "ref_captions.json", json.dumps(caps))
    _write(
        tmp_path / "train_list.txt", "Ab_000001_000011\nCd_000002_000012\nEf_000003_000013\nGh_9\n"
    )
    _write(tmp_path / "test_list.txt", "Cd_000002_000012\n")
    _videos(tmp_path, ["Ab_000001_000011.mp4", "Cd_000002_000012.mp4", "Ef_000003_000013.mp4"])
    rep = SkipReport()
    recs = get_reader("vatex")(str(tmp_path), "train", expand_sentences=True, report=rep)
    assert [(r.video_id, r.captions) for r in recs] == [
        ("Ab_000001_000011", ("A person cooks.",)),
        ("Ab_000001_000011", ("Someone is cooking food.",)),
        ("Cd_000002_000012", ("A horse runs.",)),
    ]
    assert rep.counts() == {"unreadable annotation row": 2, "no annotation": 1}
    for split in ("val", "test"):  # val uses test_list.txt, as the original
        recs = get_reader("vatex")(str(tmp_path), split, report=SkipReport())
        assert [r.video_id for r in recs] == ["Cd_000002_000012"] and recs[0].split == split


# ----------------------------------------------------------------------------- general
def test_registry_and_records(tmp_path):
    assert set(READERS) == {"msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "vatex"}
    with pytest.raises(ValueError, match="unknown dataset 'kinetics'; known: activitynet"):
        get_reader("kinetics")
    with pytest.raises(ValueError, match="unknown split"):
        get_reader("vatex")(str(tmp_path), "dev")
    with pytest.raises(TypeError):
        ClipRecord("v", "p", ["list"], None, None, "train")
    rep = SkipReport()
    rep.add("a.mp4", "missing video")
    rep.add("b.csv:3", "empty caption", "tab\there")
    rep.add("c.mp4", "missing video")
    assert rep.summary() == "skipped: 3 (2 missing video, 1 empty caption)"
    txt = rep.write(str(tmp_path / "r" / "skipped.txt"))
    lines = open(txt).read().splitlines()
    assert lines[0].startswith("# skipped: 3") and lines[2] == "empty caption\tb.csv:3\ttab here"
    js = json.load(open(rep.write(str(tmp_path / "skipped.json"))))
    assert js["counts"] == {"missing video": 2, "empty caption": 1} and len(js["entries"]) == 3


# ---------------------------------------------------------------------- the reader loop
def test_group_captions_order_quirks_and_places():
    """Flat items (one caption each): a video comes with its first usable caption; an item
    or caption a rule rejects is reported at its own place, as are unusable captions."""

    def rule(where, item):
        vid, cap = item
        return C.Unreadable("no id") if vid is None else (vid, [(where, cap)])

    items = [
        ("f:1", ("b", "  ")),  # b's first caption is empty: b comes after a
        ("f:2", ("a", "a one")),
        ("f:3", (None, "x")),
        ("f:4", ("b", "b  one")),
        ("f:5", ("a", C.Unreadable("bad tokens"))),
        ("f:6", ("a", "a two")),
        ("f:7", ("c", 5)),  # no usable caption: c is not there at all
    ]
    rep = SkipReport()
    got = C.group_captions(items, rule, rep, False)
    assert list(got.items()) == [("a", ["a one", "a two"]), ("b", ["b one"])]
    assert [(e["file"], e["reason"], e["detail"]) for e in rep] == [
        ("f:1", "empty caption", ""),
        ("f:3", "unreadable annotation row", "no id"),
        ("f:5", "unreadable annotation row", "bad tokens"),
        ("f:7", "unreadable annotation row", "caption is int"),
    ]
    with pytest.raises(DataError, match=r"^f:1: empty caption$"):
        C.group_captions(items, rule, None, True)


def test_group_captions_keep_empty_and_last_wins():
    # One entry per video: a video without a usable caption stays (the records step counts
    # it), in entry order; caption k of an entry is reported at its own place.
    entries = [("j[v]", ("v", ["", 5])), ("j[w]", ("w", [" w "]))]
    rep = SkipReport()
    got = C.group_captions(entries, C.each_caption, rep, False, keep_empty=True)
    assert list(got.items()) == [("v", []), ("w", ["w"])]
    assert [e["file"] for e in rep] == ["j[v][0]", "j[v][1]"]
    # A repeated video replaces the earlier item, keeping its place; the earlier one is the
    # duplicate. A repeat whose caption is unusable replaces nothing.
    rows = [("f:1", ("m1", "first")), ("f:2", ("m2", "x")), ("f:3", ("m1", "")),
            ("f:4", ("m1", "last"))]  # fmt: skip
    rep = SkipReport()
    got = C.group_captions(
        rows,
        lambda where, r: (r[0], [(where, r[1])]),
        rep,
        False,
        last_wins=lambda vid, where: f"{vid} again at {where}",
    )
    assert list(got.items()) == [("m1", ["last"]), ("m2", ["x"])]
    assert [(e["file"], e["reason"], e["detail"]) for e in rep] == [
        ("f:3", "empty caption", ""),
        ("f:1", "duplicate id", "m1 again at f:4"),
    ]


def test_listed_checks_each_id_when_taken():
    ids = [("l:1", "a"), ("l:2", 7), ("l:3", "zz"), ("l:4", "a"), ("l:5", "b")]
    rep = SkipReport()
    taken = []
    rule = lambda v: v if isinstance(v, str) else C.Unreadable("bad id")  # noqa: E731
    for vid in C.listed(ids, {"a": 1, "b": 2}, "not in ann.json", rep, False, rule):
        taken.append(vid)
        rep.add(f"caller:{vid}", "caller's check")  # comes right after the id's own checks
    assert taken == ["a", "b"]
    assert [(e["file"], e["reason"], e["detail"]) for e in rep] == [
        ("caller:a", "caller's check", ""),
        ("l:2", "unreadable annotation row", "bad id"),
        ("l:3", "no annotation", "video id zz not in ann.json"),
        ("l:4", "duplicate id", "id a already at l:1"),
        ("caller:b", "caller's check", ""),
    ]


def test_make_read_split(tmp_path):
    """A toy dataset from its rules alone: the split check, paragraphs, clip times, the
    record split and file names come from `make_read_split`."""
    _videos(tmp_path, ["x_a.mp4", "b.webm", "d.mp4"])
    seen = []

    def videos(root, split, report, strict):
        seen.append((root, split, strict))
        return [("a", ["one.", "two."]), ("b", ["three."]), ("c", ["no file"]), ("d", [])]

    read = C.make_read_split(
        "toy",
        ("train", "extra"),
        videos,
        file_names=lambda v: [v, "x_" + v],
        paragraph=True,
        clip=(1.0, 2.5),
        record_split={"extra": "train"},
    )
    rep = SkipReport()
    recs = read(str(tmp_path), "extra", expand_sentences=True, report=rep)
    assert [(r.video_id, r.captions, r.start, r.end, r.split) for r in recs] == [
        ("a", ("one. two.",), 1.0, 2.5, "train"),
        ("b", ("three.",), 1.0, 2.5, "train"),
    ]
    assert recs[0].video_path.endswith("x_a.mp4")
    assert [(os.path.basename(e["file"]), e["reason"]) for e in rep] == [
        ("c", "missing video"),
        ("d.mp4", "no annotation"),
    ]
    assert seen == [(str(tmp_path), "extra", False)]
    with pytest.raises(ValueError, match=r"toy: unknown split 'test'"):
        read(str(tmp_path), "test")
    assert seen == [(str(tmp_path), "extra", False)]  # the split is checked first
    plain = C.make_read_split("toy", ("train",), videos)
    recs = plain(str(tmp_path), "train", expand_sentences=True, report=SkipReport())
    assert [(r.video_id, r.captions, r.start) for r in recs] == [
        ("b", ("three.",), None)  # "a" has no file named "a"
    ]
    recs = plain(str(tmp_path), "train", video_dir=str(tmp_path / "videos"), report=None)
    assert [r.captions for r in recs] == [("three.",)]


def test_every_reader_is_made_by_the_loop():
    """Each reader states rules (`videos`) and gets `read_split` from `make_read_split`: no
    dataset keeps a loop of its own."""
    for module in MODULES:
        assert callable(module.videos), module.NAME
        assert module.read_split.__qualname__ == "make_read_split.<locals>.read_split"
        assert module.NAME in module.read_split.__doc__
