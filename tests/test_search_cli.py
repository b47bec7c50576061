"""The search command line (ucofia_jax/search/__main__.py): what it imports before answering,
its output per the search contract (text and JSON), the flags it passes on, the persistent
compilation cache, the demo model's notice, and a port in use.

Speed itself is measured by benchmarks/search_latency.py, not here: these tests check the
causes (no jax before `--help`, no TensorFlow on the query path, programs kept in the cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _env import one_device_env

from ucofia_jax.runtime import caches
from ucofia_jax.search import __main__ as cli
from ucofia_jax.search import source as source_lib
from ucofia_jax.search.index import Hit

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "orbax", "lancedb", "tensorflow")


def run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = one_device_env(**env)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Runs the CLI's main() in a fresh interpreter and prints the status and which of HEAVY it
# imported on the way.
MODULES_AFTER_MAIN = """
import json, sys
from ucofia_jax.search.__main__ import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print(json.dumps({{"status": status, "heavy": heavy}}))
""".format(heavy=set(HEAVY))


def main_in_fresh_process(*argv: str) -> tuple[dict, str]:
    res = run_python(MODULES_AFTER_MAIN, *argv)
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


@pytest.mark.parametrize("argv", [["--help"], ["query", "--help"], ["index", "--help"]])
def test_help_imports_nothing_heavy(argv):
    got, _ = main_in_fresh_process(*argv)
    assert got == {"status": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["query", "--index", "no/such.ucofia", "a dog"], "no/such.ucofia: no such index"),
        (["serve", "--index", "no/such.ucofia"], "no/such.ucofia: no such index"),
        (["export", "--index", "no/such.ucofia", "--out", "x"], "no such index"),
        (["query", "--index", "README.md", "a dog"], "README.md: not a ucofia search index"),
    ],
)
def test_a_misspelt_index_is_one_line_before_anything_heavy_loads(argv, fragment):
    got, err = main_in_fresh_process(*argv)
    assert got == {"status": 2, "heavy": []}
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: ")
    assert fragment in err


WHOLE = Hit(1, 11.2418, 0.93, "clips/a.mp4", None, None, "0" * 16, 4.0)
MOMENT = Hit(2, 9.5, 0.41, "talk.mp4", 12.0, 20.0, "1" * 16, 600.0)


def test_text_lines_rank_score_confidence_path_and_moment():
    assert cli.hit_line(WHOLE) == "    1   11.2418  0.93  clips/a.mp4"
    assert cli.hit_line(MOMENT) == "    2    9.5000  0.41  talk.mp4 [12.0-20.0 s]"
    assert cli.query_lines("q", [WHOLE], no_match=False) == ["query: q", cli.hit_line(WHOLE)]
    weak = cli.query_lines("asdf", [MOMENT], no_match=True)
    assert weak == ["query: asdf", f"  {cli.NO_GOOD_MATCH_LINE}", cli.hit_line(MOMENT)]
    assert "no good match" in cli.NO_GOOD_MATCH_LINE


class RecordingIndex:
    """Stands in for Index in cmd_query: records the keyword arguments of search()."""

    meta = {"source": {"workdir": ""}}

    def __init__(self):
        self.kwargs = []

    def search(self, texts, **kwargs):
        self.kwargs.append(kwargs)
        return [[MOMENT] if "asdf" in t else [WHOLE, MOMENT] for t in texts]


def test_query_passes_only_the_flags_given_and_writes_the_contract_json(monkeypatch, capsys):
    index = RecordingIndex()
    monkeypatch.setattr(cli, "_open", lambda a: index)
    judged = []

    def no_good_match(hits):
        judged.append(len(hits))
        return len(hits) == 1

    import ucofia_jax.search.index as index_lib  # noqa: PLC0415 -- patched for this test

    monkeypatch.setattr(index_lib, "no_good_match", no_good_match, raising=False)
    argv = ["query", "--index", "x", "--json", "--per_file", "2", "a red circle", "asdf"]
    assert cli.main(argv) == 0
    assert index.kwargs == [{"per_file": 2}]  # --top and --shortlist: the API's defaults
    out = json.loads(capsys.readouterr().out)
    assert [o["query"] for o in out] == ["a red circle", "asdf"]
    assert [o["no_good_match"] for o in out] == [False, True] and judged == [2, 1]
    assert out[0]["hits"][1] == {
        "rank": 2,
        "score": 9.5,
        "confidence": 0.41,
        "path": "talk.mp4",
        "start": 12.0,
        "end": 20.0,
        "video_id": "1" * 16,
        "duration": 600.0,
    }
    assert cli.main(["query", "--index", "x", "--top", "3", "--shortlist", "7", "a"]) == 0
    assert index.kwargs[-1] == {"top": 3, "shortlist": 7}
    text = capsys.readouterr().out
    assert text.splitlines() == ["query: a", cli.hit_line(WHOLE), cli.hit_line(MOMENT)]


def test_index_passes_window_stride_and_follow_symlinks(monkeypatch, tmp_path, capsys):
    from ucofia_jax.search import indexer  # noqa: PLC0415 -- patched for this test

    calls = []

    class Summary:
        def lines(self):
            return ["indexed 0"]

    def fake_build_index(videos, index, model, **kwargs):
        calls.append(kwargs)
        return Summary()

    monkeypatch.setattr(indexer, "build_index", fake_build_index)
    monkeypatch.setattr(source_lib, "load_model", lambda src: "model")
    enabled = []
    monkeypatch.setattr(caches, "enable_compilation_cache", lambda: enabled.append(1))
    base = ["index", "--videos", str(tmp_path), "--index", str(tmp_path / "i"), "--workdir", "w"]
    assert cli.main(base) == 0
    assert set(calls[-1]) == {"workers", "strict", "progress"}  # the rest: the API's defaults
    argv = base + ["--window", "8", "--stride", "4", "--follow_symlinks", "--batch_size", "3"]
    assert cli.main(argv) == 0
    assert {k: calls[-1][k] for k in ("window", "stride", "follow_symlinks", "batch_size")} == {
        "window": 8.0,
        "stride": 4.0,
        "follow_symlinks": True,
        "batch_size": 3,
    }
    assert "indexed 0" in capsys.readouterr().out
    # The cache is a setting of the whole process: on for `python -m`, off for a caller of
    # main() (this test's process) unless asked.
    assert enabled == []
    assert cli.main(base, compile_cache=True) == 0 and enabled == [1]


def test_port_in_use_is_error_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import socket  # noqa: PLC0415

    class Empty:
        root = tmp_path
        meta = {"source": {}}

        def __len__(self):
            return 0

    monkeypatch.setattr(cli, "_open", lambda a: Empty())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--index", "x", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "\n" not in err


def write_run_config(workdir: Path, synthetic) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    data = {"dataset": "msrvtt"}
    if synthetic is not None:
        data["synthetic"] = {"enabled": synthetic}
    (workdir / "config.json").write_text(json.dumps({"data": data}), encoding="utf-8")
    return str(workdir)


def test_training_notice_names_the_synthetic_demo_only(tmp_path):
    demo = write_run_config(tmp_path / "demo", True)
    real = write_run_config(tmp_path / "real", False)
    older = write_run_config(tmp_path / "older", None)  # a run saved before the key existed
    notice = source_lib.training_notice
    assert notice({"workdir": demo}) == source_lib.SYNTHETIC_NOTICE
    assert "synthetic" in source_lib.SYNTHETIC_NOTICE and "shapes" in source_lib.SYNTHETIC_NOTICE
    assert notice({"workdir": real}) is None and notice({"workdir": older}) is None
    assert notice({"workdir": str(tmp_path / "gone")}) is None
    assert notice({"workdir": "", "clip": "ViT-B-32.pt"}) is None
    # The repository's demo config is what sets it.
    from configs import demo as demo_config  # noqa: PLC0415

    assert demo_config.get_config().data.synthetic.enabled is True


# Compiles one small program (a few ms: under JAX's default 1 s threshold) with the cache on.
COMPILE_ONCE = """
import jax, jax.numpy as jnp
from ucofia_jax.runtime import caches
print(caches.enable_compilation_cache())
def small_program(x):
    return jnp.sin(x) @ x.T
print(float(jax.jit(small_program)(jnp.ones((8, 8))).sum()))
"""


def test_compilation_cache_keeps_small_programs(tmp_path):
    cache = tmp_path / "xla"
    res = run_python(COMPILE_ONCE, UCOFIA_COMPILE_CACHE=str(cache))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == str(cache)
    kept = [p.name for p in cache.iterdir()] if cache.is_dir() else []
    assert any(n.startswith("jit_small_program-") for n in kept), kept
    res = run_python(COMPILE_ONCE, UCOFIA_COMPILE_CACHE="off")
    assert res.returncode == 0 and res.stdout.splitlines()[0] == "None"


def test_compile_cache_lives_next_to_the_kernel_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(caches.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("UCOFIA_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert caches.compile_cache_dir() == tmp_path / "xla"


@pytest.mark.slow
def test_query_on_a_real_index_imports_neither_tensorflow_nor_flax(tmp_path):
    """The whole query path in a fresh process (a tiny model's index of 3 clips): TensorFlow
    (1-2 s to import) is not on it, nor Flax and Orbax: the index's compiled query model
    (search/query_model.py) runs without them."""
    from _search_fixtures import make_clips, save_workdir, search_config  # noqa: PLC0415

    workdir = save_workdir(tmp_path / "run", search_config())
    make_clips(tmp_path / "videos", 3)
    index = tmp_path / "videos.ucofia"
    built = run_python(
        "import sys; from ucofia_jax.search.__main__ import main; sys.exit(main(sys.argv[1:]))",
        *("index", "--videos", str(tmp_path / "videos"), "--index", str(index)),
        *("--workdir", workdir, "--workers", "0", "--no_progress"),
    )
    assert built.returncode == 0, built.stderr[-2000:]
    got, err = main_in_fresh_process("query", "--index", str(index), "a red circle")
    assert got["status"] == 0, err[-2000:]
    assert not any(m.split(".")[0] in ("tensorflow", "flax", "orbax") for m in got["heavy"])
    assert "jax" in got["heavy"]  # the model did run in that process
