"""Search your own videos (ucofia_jax/search): scan / plan / decode / scoring units, the
index built from real mp4 files by a tiny model saved as a training run, and the CLI.

Fast tests need no model. The slow ones share one module fixture (a random-init tiny model
in a workdir + 6 rendered clips + 4 broken files, indexed once in this process) and run the
CLI in subprocesses where a process boundary is the point (SIGKILL, README commands).

Tolerances: stored features are float16, so a score from the index may differ from the
float32 one by the float16 rounding of the features; ``F16_TOL`` = 5e-3 bounds it (the demo
measures ~1e-3, docs/search.md). Rankings are compared exactly where the float32 scores of
neighbours differ by more than that, and allowed to swap within it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pytest
from _env import one_device_env
from _search_fixtures import make_clips, save_workdir, search_config, write_bad_files
from safetensors.numpy import load_file

from configs import demo
from data_pipeline import video as video_lib
from data_pipeline.sampling import FrameSampling
from ucofia_jax.config import base_config
from ucofia_jax.models.features import VideoFeatures
from ucofia_jax.search import __main__ as cli
from ucofia_jax.search import decoding, indexer
from ucofia_jax.search import source as source_lib
from ucofia_jax.search.index import Index, encode_videos
from ucofia_jax.search.source import ModelSource, describe_config, fingerprint_of, load_model
from ucofia_jax.search.store import Store, features_from_arrow, row_id_for

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
F16_TOL = 5e-3


# =========================================================================== fast units


def test_scan_finds_videos_recursively_and_skips_hidden_and_the_index(tmp_path):
    for rel in (
        "a.mp4",
        "sub/b.MKV",
        "sub/deeper/c.webm",
        "d.mov",
        "e.avi",
        "notes.txt",
        ".hidden/f.mp4",
        "idx/g.mp4",
    ):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = [f.rel for f in indexer.scan(tmp_path, exclude=(tmp_path / "idx").resolve())]
    assert got == ["a.mp4", "d.mov", "e.avi", "sub/b.MKV", "sub/deeper/c.webm"]


class _FakeStore:
    def __init__(self, rows):
        self.rows = rows

    def catalogue(self):
        return pa.table(
            {
                "path": [r[0] for r in self.rows],
                "size": [r[1] for r in self.rows],
                "mtime_ns": [r[2] for r in self.rows],
                "content_hash": [f"h-{r[0]}" for r in self.rows],
                "start": [None for _ in self.rows],
            }
        )


def test_plan_new_changed_deleted_unchanged():
    F = indexer.FileInfo
    files = [F("a.mp4", "/a", 1, 10), F("b.mp4", "/b", 2, 20), F("n.mp4", "/n", 3, 30)]
    store = _FakeStore([("a.mp4", 1, 10), ("b.mp4", 2, 21), ("gone.mp4", 5, 5)])
    plan = indexer.make_plan(store, files, hash_file=lambda path: "other content")
    assert [f.rel for f in plan.new] == ["n.mp4"]
    assert [f.rel for f in plan.changed] == ["b.mp4"]
    assert plan.deleted == ["gone.mp4"] and plan.unchanged == 1
    assert [f.rel for f in plan.to_encode] == ["b.mp4", "n.mp4"]


def test_decode_one_names_the_reason_of_each_bad_file(tmp_path):
    expected = write_bad_files(tmp_path)
    for name, reason in expected.items():
        res = decoding.decode_one(
            {
                "path": str(tmp_path / name),
                "rel": name,
                "sampling": FrameSampling.from_config(search_config().data),
            }
        )
        assert res.get("reason") == reason, (name, res)


def test_decode_one_takes_the_sampling_and_its_jpeg_round_trip(tmp_path):
    """A search decode is the builder's: decode_clip with the job's sampling, then the JPEG
    round trip at its quality; changing a field changes the frames."""
    make_clips(tmp_path / "clips", 1)
    path = str(tmp_path / "clips" / "video0.mp4")
    sampling = FrameSampling.from_config(search_config().data)

    def decode(s):
        return decoding.decode_one({"path": path, "rel": "v", "sampling": s})

    for s in (sampling, sampling.replace(max_frames=3), sampling.replace(image_size=24)):
        got = decode(s)
        frames, mask = video_lib.decode_clip(path, s)
        assert got["frames"].shape == (s.max_frames, s.image_size, s.image_size, 3)
        np.testing.assert_array_equal(got["mask"], mask)
        np.testing.assert_array_equal(
            got["frames"], decoding.jpeg_round_trip(frames, s.jpeg_quality)
        )
    assert not np.array_equal(
        decode(sampling.replace(jpeg_quality=5))["frames"], decode(sampling)["frames"]
    )


def test_fingerprint_description_keeps_its_layout():
    """Indexes written before FrameSampling still match: the description is the same JSON
    ('sampling' with the text side's max_words, the JPEG quality beside it)."""
    keys = ("max_frames", "max_words", "image_size", "feature_framerate", "slice_framepos")
    for c in (demo.get_config(), search_config()):
        d = describe_config(c, clip_only=False)
        assert set(d) == {"model", "sampling", "jpeg_quality", "seed", "clip_only"}
        assert d["sampling"] == {k: c.data[k] for k in keys}
        assert d["jpeg_quality"] == c.data.jpeg_quality == 95  # what every index was made with


def test_cli_user_errors_exit_2_with_one_line_naming_the_problem(tmp_path, capsys):
    missing = tmp_path / "nothing.ucofia"
    assert cli.main(["query", "--index", str(missing), "a dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "Traceback" not in err
    not_index = tmp_path / "photos"
    not_index.mkdir()
    (not_index / "x.jpg").write_bytes(b"1")
    assert cli.main(["export", "--index", str(not_index), "--out", str(tmp_path / "o")]) == 2
    assert "not a ucofia search index" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "index",
                "--videos",
                str(tmp_path / "no_dir"),
                "--index",
                str(missing),
                "--workdir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no_dir" in capsys.readouterr().err
    assert cli.main(["index", "--videos", str(tmp_path), "--index", str(missing)]) == 2
    assert "needs a model" in capsys.readouterr().err
    assert cli.main(["query", "--index", str(missing)]) == 2
    assert "no query" in capsys.readouterr().err


# =========================================================================== with a model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A random-init tiny model saved as a run, 6 clips + 4 broken files, indexed once."""
    tmp = tmp_path_factory.mktemp("search")
    config = search_config(noise_at_eval=True)
    workdir = save_workdir(tmp / "run", config)
    clips = tmp / "clips"
    captions = make_clips(clips, 6)
    bad = write_bad_files(clips)
    model = load_model(ModelSource(workdir=workdir))
    summary = indexer.build_index(
        clips, tmp / "idx", model, workers=1, batch_size=4, progress=False
    )
    return {
        "tmp": tmp,
        "workdir": workdir,
        "clips": clips,
        "captions": captions,
        "bad": bad,
        "model": model,
        "index": tmp / "idx",
        "summary": summary,
        "config": config,
    }


@pytest.mark.slow
def test_index_search_thumbnail_and_bad_files_listed(built):
    s = built["summary"]
    assert s.indexed == 6 and s.total == 6
    assert {e["file"]: e["reason"] for e in s.skipped} == built["bad"]
    text = "\n".join(s.lines())
    for name, reason in built["bad"].items():
        assert f"skipped {name}: {reason}" in text
    index = Index.open(built["index"], model=built["model"])
    assert len(index) == 6 and index.root == built["clips"].resolve()
    caps = list(built["captions"].values())
    hits = index.search(caps[:2], top=4)
    assert [len(h) for h in hits] == [4, 4]
    for hs in hits:
        assert [h.rank for h in hs] == [1, 2, 3, 4]
        assert all(a.score >= b.score for a, b in zip(hs, hs[1:]))
        assert all(h.path in built["captions"] for h in hs)
        assert all(
            h.video_id == row_id_for(decoding.content_hash(str(built["clips"] / h.path)), None)
            for h in hs
        )
    # Whole files: no moment bounds, the file's duration (the fixture renders 2 s clips).
    assert all(0.0 <= h.confidence <= 1.0 for hs in hits for h in hs)
    assert all(h.start is None and h.end is None for hs in hits for h in hs)
    durations = [h.duration for hs in hits for h in hs]
    assert all(d is not None and 1.5 <= d <= 2.5 for d in durations), durations
    jpeg = index.thumbnail(hits[0][0].video_id)
    assert jpeg[:2] == b"\xff\xd8"  # JPEG SOI
    assert index.thumbnail("../../etc/passwd") is None
    assert index.contains_path(hits[0][0].path) and not index.contains_path("nope.mp4")
    d = index.describe()
    assert d["count"] == 6 and d["fingerprint"] == built["model"].fingerprint
    assert d["clip_only"] is False and d["shortlist"] == indexer.DEFAULT_SHORTLIST


@pytest.mark.slow
def test_float16_store_changes_scores_little_and_rankings_match_float32(built):
    """Scores from the index (float16 features) vs the same videos encoded now in float32
    (encode_videos, same per-video noise: keyed by the content hash)."""
    model, index = built["model"], Index.open(built["index"], model=built["model"])
    names = sorted(built["captions"])
    f32 = encode_videos([built["clips"] / n for n in names], model)
    caps = [built["captions"][n] for n in names]
    exact = model.score(model.encode_texts(caps), f32)  # [T, V] float32 features
    for t, hits in enumerate(index.search(caps, top=len(names), shortlist=len(names))):
        order = [names.index(h.path) for h in hits]
        got = np.array([h.score for h in hits])
        np.testing.assert_allclose(got, exact[t, order], atol=F16_TOL, rtol=0)
        _assert_ranking(exact[t], order)


@pytest.mark.slow
def test_index_shortlist_is_the_models_coarse_score(built):
    """With K < N the candidates are the K best stored rows by the head's video-sentence
    level. The run's projections are the identity (a fresh init), so the test gives the model
    trained-like ones, I + 3 N(0,1)/sqrt(d) (the video features do not depend on them): a
    shortlist by the plain sentence . vector cosine fails it."""
    rng = np.random.default_rng(0)
    params = jax.device_get(built["model"].params)
    head = dict(params["head"])
    d = head["global_mat_weight"].shape[0]
    for name in ("global_mat_weight", "global_mat_weight_1"):
        head[name] = np.eye(d, dtype=np.float32) + 3 * rng.standard_normal((d, d)).astype(
            np.float32
        ) / np.sqrt(d)
    model = dataclasses.replace(built["model"], params={**params, "head": head})
    index = Index.open(built["index"], model=model)
    shapes = index.meta["shapes"]
    feats = features_from_arrow(
        index.store.read_columns(["vector", "frames", "pixels", "mask"]), shapes
    )
    video = VideoFeatures(feats["vector"], feats["frames"], feats["pixels"], feats["mask"])
    caps = list(built["captions"].values())
    level1 = np.asarray(
        model.model.score(model.params, model.encode_texts(caps), video).video_sentence
    )
    for t, ranked in enumerate(index.rank(caps, shortlist=3)):
        assert sorted(ranked.rows.tolist()) == sorted(np.argsort(-level1[t])[:3].tolist())
        np.testing.assert_allclose(ranked.coarse, level1[t, ranked.rows], rtol=1e-4, atol=1e-4)


def _assert_ranking(reference: np.ndarray, order: list, tol: float = F16_TOL):
    """``order`` ranks every item once, best first by ``reference`` up to swaps of items
    whose reference scores are within ``tol``."""
    assert sorted(order) == list(range(len(reference)))
    ranked = reference[np.asarray(order)]
    assert np.all(np.diff(ranked) <= tol), (ranked, np.sort(reference)[::-1])


@pytest.mark.slow
def test_incremental_add_two_touch_one_delete_one(built, tmp_path):
    clips = tmp_path / "clips"
    make_clips(clips, 4, seed=1)
    model = built["model"]
    first = indexer.build_index(
        clips, tmp_path / "idx", model, workers=0, batch_size=4, progress=False
    )
    assert (first.indexed, first.total) == (4, 4)
    store = Store.open(tmp_path / "idx")
    before = {r["path"]: r for r in store.table.to_arrow().to_pylist()}

    extra = make_clips(tmp_path / "more", 2, seed=2)
    for i, name in enumerate(extra):
        os.replace(tmp_path / "more" / name, clips / f"new{i}.mp4")
    touched = clips / "video1.mp4"  # other content (video3's bytes), a new mtime
    shutil.copy2(clips / "video3.mp4", touched)
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    (clips / "video2.mp4").unlink()
    s = indexer.build_index(clips, tmp_path / "idx", model, workers=0, batch_size=4, progress=False)
    assert (s.indexed, s.changed, s.removed, s.unchanged, s.total) == (3, 1, 1, 2, 5)
    after = {r["path"]: r for r in Store.open(tmp_path / "idx").table.to_arrow().to_pylist()}
    assert sorted(after) == ["new0.mp4", "new1.mp4", "video0.mp4", "video1.mp4", "video3.mp4"]
    for p in ("video0.mp4", "video3.mp4"):  # untouched rows are the very same rows
        assert after[p] == before[p]
    assert after["video1.mp4"]["mtime_ns"] == touched.stat().st_mtime_ns
    again = indexer.build_index(clips, tmp_path / "idx", model, workers=0, progress=False)
    assert (again.indexed, again.unchanged, again.removed) == (0, 5, 0)


@pytest.mark.slow
def test_model_mismatch_is_refused(built, tmp_path, capsys):
    other = save_workdir(tmp_path / "other", built["config"], seed_offset=1)
    code = cli.main(["query", "--index", str(built["index"]), "--workdir", other, "a dog"])
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err and built["model"].fingerprint in err
    code = cli.main(
        [
            "index",
            "--videos",
            str(built["clips"]),
            "--index",
            str(built["index"]),
            "--workdir",
            other,
            "--no_progress",
        ]
    )
    assert code == 2 and "another model" in capsys.readouterr().err


@pytest.mark.slow
def test_query_json_and_export(built, tmp_path, capsys):
    caps = list(built["captions"].values())[:2]
    assert cli.main(["query", "--index", str(built["index"]), "--json", "--top", "3", *caps]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["query"] for o in out] == caps and all(len(o["hits"]) == 3 for o in out)
    assert {"rank", "score", "confidence", "path", "start", "end", "duration", "video_id"} == set(
        out[0]["hits"][0]
    )
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(caps) + "\n\n")
    assert cli.main(["query", "--index", str(built["index"]), "--queries", str(qfile)]) == 0
    assert capsys.readouterr().out.count("query: ") == 2

    out_dir = tmp_path / "feats"
    assert (
        cli.main(
            [
                "export",
                "--index",
                str(built["index"]),
                "--out",
                str(out_dir),
                "--rows_per_shard",
                "4",
            ]
        )
        == 0
    )
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["count"] == 6 and [s["rows"] for s in manifest["shards"]] == [4, 2]
    stored = {r["video_id"]: r for r in Store.open(built["index"]).table.to_arrow().to_pylist()}
    for shard in manifest["shards"]:
        tensors = load_file(str(out_dir / shard["file"]))
        assert tensors["pixels"].dtype == np.float16
        assert tensors["pixels"].shape[1:] == tuple(manifest["shapes"]["pixels"])
        for i, vid in enumerate(shard["video_id"]):
            assert stored[vid]["path"] == shard["path"][i]
            np.testing.assert_array_equal(
                tensors["vector"][i], np.asarray(stored[vid]["vector"], np.float16)
            )


# =========================================================================== subprocesses


def _env():
    env = one_device_env()  # one CPU device, as users run it
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(built, tmp_path):
    """One commit per video (--batch_size 1); SIGKILL as soon as the first is there."""
    n = 30
    clips = tmp_path / "clips"
    make_clips(clips, n, seed=3)
    idx = tmp_path / "idx"
    args = [
        sys.executable,
        "-m",
        "ucofia_jax.search",
        "index",
        "--videos",
        str(clips),
        "--index",
        str(idx),
        "--workdir",
        built["workdir"],
        "--workers",
        "1",
        "--batch_size",
        "1",
        "--no_progress",
    ]
    proc = subprocess.Popen(
        args,
        env=_env(),
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                committed = len(Store.open(idx)) if Store.exists(idx) else 0
            except Exception:  # caught mid-creation: its first commit is not there yet
                committed = 0
            if committed >= 1:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = Store.open(idx).catalogue().column("path").to_pylist()
    assert 1 <= len(partial) < n, f"killed too late or too early ({len(partial)} rows)"
    rerun = subprocess.run(
        args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    paths = Store.open(idx).catalogue().column("path").to_pylist()
    assert sorted(paths) == sorted(f"video{i}.mp4" for i in range(n))  # none lost, no dup
    assert set(partial) <= set(paths)
    m = re.search(r"indexed (\d+) .*unchanged (\d+)", rerun.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (n - len(partial), len(partial))


def _readme_search_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Search your videos\n")
    end = text.find("\n## ", start + 5)
    section = text[start : end if end >= 0 else len(text)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_search_section_runs_as_written(built, tmp_path):
    """Every command of README "Search your videos", in a directory laid out as the demo
    leaves it (workdir/demo with a run's config.json + checkpoint and the synthetic clips
    under data/raw/videos), here the tiny model and 6 clips, run literally: ``.venv`` there is
    the virtualenv running the tests (``make test``'s). ``make demo`` is README Quick start's
    (tests/test_front_door.py); ``serve`` is started, fetched, stopped."""
    (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    demo = tmp_path / "workdir" / "demo"
    save_workdir(demo, built["config"])
    make_clips(demo / "data" / "raw" / "videos", 6)
    commands = _readme_search_commands()
    assert any(" index " in c for c in commands) and any(" serve " in c for c in commands)
    ran = set()
    for line in commands:
        argv = shlex.split(line, comments=True)
        if argv == ["make", "demo"]:
            continue  # the demo run: README Quick start, tested in test_front_door
        assert argv[:3] == [".venv/bin/python", "-m", "ucofia_jax.search"], line
        cmd = argv[3]
        if cmd == "serve":
            _check_serve(argv, tmp_path)
        else:
            res = subprocess.run(
                argv, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
            if cmd == "query":
                hit = r"^\s+1\s+-?\d+\.\d+\s+[01]\.\d\d\s+video\d+\.mp4$"  # rank score conf path
                assert re.search(hit, res.stdout, re.M), res.stdout
        ran.add(cmd)
    assert ran == {"index", "query", "serve", "export"}


def _check_serve(argv, cwd):
    if not (REPO / "ucofia_jax" / "search" / "web.py").exists():
        pytest.skip("ucofia_jax/search/web.py (the page) is not there yet")
    port = _free_port()
    argv = [a if a != "8080" else str(port) for a in argv]
    proc = subprocess.Popen(
        argv,
        env=_env(),
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "serve did not answer"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# =========================================================================== vs evaluation


@pytest.mark.slow
def test_search_ranking_equals_the_evaluations_ranking(tmp_path):
    """A tiny demo run (main.run: synthetic set, 3 training steps), then its test clips are
    indexed as plain files and queried with the test captions. Compared, per caption: the
    search ranking of all test videos (K = all, so no shortlist cut) against the ranking of
    the evaluation's similarity matrix (evaluator.evaluate, sk_norm=False) for the same
    checkpoint, both with the noise-free token selection (selection_noise_at_eval=False:
    the evaluation draws its noise per batch, search per video). Scores agree to F16_TOL."""
    import shutil  # noqa: PLC0415 -- only here

    from data_pipeline import pipeline  # noqa: PLC0415 -- TensorFlow; only this test
    from ucofia_jax import main  # noqa: PLC0415 -- the program; only this test
    from ucofia_jax.evaluation import evaluator  # noqa: PLC0415
    from ucofia_jax.runtime import sharding  # noqa: PLC0415

    c = search_config(noise_at_eval=False)
    c.data.synthetic.update(
        dict(
            enabled=True,
            num_train=16,
            num_test=8,
            frame_size=16,
            num_seconds=2,
            fps=2,
            captions_per_video=2,
            seed=0,
        )
    )
    c.train.update(dict(batch_size=8, epochs=0, num_steps=3, checkpoint_every_steps=3))
    c.eval.update(dict(write_report=False))
    workdir = str(tmp_path / "run")
    main.run(c, workdir, "train", progress=False)

    test = pipeline.VideoTextData(c.data, split=c.data.eval_split)
    clips = tmp_path / "clips"
    clips.mkdir()
    for vid in test.video_ids:
        shutil.copy(Path(c.data.manual_dir) / "videos" / f"{vid}.mp4", clips / f"{vid}.mp4")
    model = load_model(ModelSource(workdir=workdir))
    indexer.build_index(clips, tmp_path / "idx", model, workers=0, progress=False)
    index = Index.open(tmp_path / "idx", model=model)

    mesh = sharding.make_mesh(c.mesh)
    ev = evaluator.evaluate(
        model.fns,
        model.params,
        mesh,
        c.eval,
        test,
        rng=jax.random.PRNGKey(c.seed + 1),
        sk_norm=False,
    )
    texts = list(test.texts)
    n = len(test.video_ids)
    column = {f"{v}.mp4": j for j, v in enumerate(test.video_ids)}
    for t, hits in enumerate(index.search(texts, top=n, shortlist=n)):
        order = [column[h.path] for h in hits]
        _assert_ranking(ev.similarity[t], order)
        np.testing.assert_allclose(
            [h.score for h in hits], ev.similarity[t, order], atol=F16_TOL, rtol=0
        )


# =========================================================================== clip_only

_CLIP_ONLY_CONFIG = """
from configs import demo


def get_config():
    c = demo.get_config()
    c.model.clip.update(
        dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
             vision_patch_size=8, context_length=77, vocab_size=49408, text_width=128,
             text_heads=2, text_layers=2, token_shift_blocks=(1,))
    )
    c.data.update(dict(max_frames=2, image_size=32, max_words=8))
    return c
"""


@pytest.mark.slow
def test_clip_only_scores_are_the_mean_pooled_clip_cosine(built, tmp_path):
    """``--clip`` (a random HF CLIP directory) ``--clip_only``: every score equals the cosine
    of the mean of HF CLIP's image features of the video's frames (the indexed frames, taken
    from the same decoder) with HF CLIP's text feature, to 1e-2 (float16 store, float32
    towers in two frameworks); token shift is off although the config asks for it."""
    import torch  # noqa: PLC0415 -- the reference only
    from clip_testutil import TINY, random_hf_clip  # noqa: PLC0415 -- transformers

    from ucofia_jax.models import tokenizer  # noqa: PLC0415

    sizes = dict(TINY, vocab_size=49408, context_length=77)
    hf = random_hf_clip(sizes, seed=1)
    hf.save_pretrained(str(tmp_path / "clip"))
    cfg = tmp_path / "clip_only_config.py"
    cfg.write_text(_CLIP_ONLY_CONFIG)
    code = cli.main(
        [
            "index",
            "--videos",
            str(built["clips"]),
            "--index",
            str(tmp_path / "idx"),
            "--clip",
            str(tmp_path / "clip"),
            "--config",
            str(cfg),
            "--clip_only",
            "--workers",
            "0",
            "--no_progress",
        ]
    )
    assert code == 0
    index = Index.open(tmp_path / "idx")
    assert index.describe()["clip_only"] is True and "pixels" not in index.meta["shapes"]
    caps = list(built["captions"].values())[:2]
    model = index.model
    ids, _ = tokenizer.tokenize(caps, 8)
    with torch.no_grad():
        text = _pooled(hf.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
        for t, hits in enumerate(index.search(caps, top=len(index))):
            for h in hits:
                d = decoding.decode_one(model.decode_job(str(index.root / h.path), h.path))
                x = torch.from_numpy(d["frames"][d["mask"] > 0]).float() / 255.0
                mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
                std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
                x = ((x - mean) / std).permute(0, 3, 1, 2)
                img = torch.nn.functional.normalize(
                    _pooled(hf.get_image_features(pixel_values=x)), dim=-1
                )
                video = torch.nn.functional.normalize(img.mean(0), dim=-1).numpy()
                assert abs(h.score - float(text[t] @ video)) < 1e-2, (h, float(text[t] @ video))


def _pooled(out):
    """transformers >= 5 returns the projected features as ``pooler_output``; older, a tensor."""
    return getattr(out, "pooler_output", out)


def test_fingerprint_covers_the_dtype_auto_resolves_to(monkeypatch):
    """'auto' builds another model on an accelerator (bf16) than on CPU (f32): the
    fingerprint follows what it resolves to, not the word."""

    def fingerprint(dtype):
        c = demo.get_config()
        c.model.clip.dtype = dtype
        return fingerprint_of(describe_config(c, clip_only=False), "weights")

    assert fingerprint("auto") == fingerprint("float32")  # this suite runs on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fingerprint("auto") == fingerprint("bfloat16") != fingerprint("float32")


def test_a_run_saved_before_a_key_existed_takes_its_default(tmp_path):
    # config.json of an older run: no data.jpeg_quality, no mesh.logical_axis_rules.
    saved = demo.get_config().to_dict()
    saved["seed"] = 7
    del saved["data"]["jpeg_quality"]
    del saved["mesh"]["logical_axis_rules"]
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    config = source_lib._read_workdir_config(str(tmp_path))
    assert config.seed == 7  # what the run saved is kept
    assert config.data.max_frames == demo.get_config().data.max_frames
    assert config.data.jpeg_quality == base_config().data.jpeg_quality
    assert FrameSampling.from_config(config.data).jpeg_quality == config.data.jpeg_quality
    assert len(config.mesh.logical_axis_rules) == len(base_config().mesh.logical_axis_rules)
