"""The README's front door is what the Makefile and CI run.

README "Quick start" opens with two commands, ``make demo`` and ``make test``; its manual
(no-make) block runs the same commands as the Makefile's recipes; ``.ci/run`` runs
``make test`` and nothing else runs tests there; the set-up stamp reinstalls only when
``requirements-lock.txt`` or ``setup.py`` is newer than the last install. All of it through
``make -n`` (prints, runs nothing). Slow: pip resolves the lock as written, and the public
index serves the label-free ``torch==2.13.0`` that the pin takes where no +cpu wheel is offered.
"""

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LOCK = ROOT / "requirements-lock.txt"
STAMP_NAME = ".ucofia-installed"  # the Makefile's STAMP, inside $(VENV)
DEMO = ["-m", "ucofia_jax.main", "--config=configs/demo.py", "--workdir=workdir/demo"]
PYTEST = ["-m", "pytest", "-q"]

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="no make here")

# An outer `make test VAR=...` exports its command-line variables (and MAKEFLAGS) to pytest;
# the make calls below must see the Makefile's defaults.
_MAKE_ENV = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "MAKEFILES",
    "VENV",
    "PYTHON",
    "WORKDIR",
    "PYTEST_ARGS",
)


def _section(title: str) -> str:
    """The text of README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n") + len(title) + 5
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else len(text)]


def _code_blocks(text: str) -> list[list[list[str]]]:
    """The fenced code blocks of ``text``, each a list of commands as argv lists."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    current.append(argv)
    return blocks


def _make_n(*args: str) -> list[list[str]]:
    """The commands `make -n ARGS` prints in the repo root, as argv lists."""
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_ENV}
    proc = subprocess.run(
        [MAKE, "-n", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"make -n {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture
def venv(tmp_path):
    """A VENV path whose set-up stamp is fresh (newer than the lock and setup.py)."""
    path = tmp_path / "venv"
    path.mkdir()
    stamp = path / STAMP_NAME
    stamp.touch()
    newest = max(os.path.getmtime(ROOT / f) for f in ("requirements-lock.txt", "setup.py"))
    if os.path.getmtime(stamp) < newest:  # a lock or setup.py dated in the future
        os.utime(stamp, (newest, newest))
    return str(path)


def test_readme_quick_start_is_make_demo_then_make_test():
    blocks = _code_blocks(_section("Quick start"))
    assert blocks[0] == [["make", "demo"]], blocks[0]
    assert blocks[1] == [["make", "test"]], blocks[1]


def test_readme_tests_section_leads_with_make_test():
    blocks = _code_blocks(_section("Tests"))
    assert blocks and blocks[0][0] == ["make", "test"], blocks
    assert ["make", "test", 'PYTEST_ARGS=-m "not slow"'] in blocks[0]
    assert ["make", "lint"] in blocks[0]


@needs_make
def test_every_make_command_in_the_readme_exists(venv):
    """Each `make ...` of Quick start and Tests names a target the Makefile has."""
    commands = [
        argv
        for title in ("Quick start", "Tests")
        for block in _code_blocks(_section(title))
        for argv in block
        if argv[0] == "make"
    ]
    assert len(commands) >= 4, commands
    for argv in commands:
        assert _make_n(f"VENV={venv}", *argv[1:])


@needs_make
def test_readme_manual_set_up_runs_the_makefile_commands(tmp_path):
    """The no-make block: the same pip installs and the same demo and test commands."""
    venv = str(tmp_path / "none")  # no stamp: make prints the whole set-up
    py = f"{venv}/bin/python"

    def plain(argv):  # `VENV/bin/python -m pip install -q X` -> `pip install X`
        if argv[:3] == [py, "-m", "pip"]:
            return ["pip", *[a for a in argv[3:] if a != "-q"]]
        return ["python" if a == py else a for a in argv]

    made = [plain(a) for a in _make_n(f"VENV={venv}", "demo")]
    manual = next(b for b in _code_blocks(_section("Quick start")) if ["python", *DEMO] in b)
    pip_installs = [a for a in made if a[:2] == ["pip", "install"] and "--upgrade" not in a]
    assert pip_installs == [
        ["pip", "install", "-r", "requirements-lock.txt"],
        ["pip", "install", "--no-deps", "-e", "."],
    ]
    assert [a for a in manual if a[0] == "pip"] == pip_installs
    assert made[-1] == ["python", *DEMO]
    assert ["python", *PYTEST] in manual
    assert _make_n(f"VENV={venv}", "test")[-1] == [py, *PYTEST]


def test_ci_runs_exactly_make_test():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines.count("make test") == 1, lines
    assert lines[-1] == "make test", lines
    assert not [line for line in lines if "pytest" in line], lines


@needs_make
@pytest.mark.parametrize(
    "target, expected",
    [
        ("demo", [["{py}", *DEMO]]),
        ("test", [["{py}", *PYTEST]]),
        (
            "lint",
            [["{venv}/bin/ruff", "format", "--check", "."], ["{venv}/bin/ruff", "check", "."]],
        ),
    ],
)
def test_fresh_stamp_runs_only_the_command(venv, target, expected):
    fill = {"py": f"{venv}/bin/python", "venv": venv}
    expected = [[a.format(**fill) for a in argv] for argv in expected]
    assert _make_n(f"VENV={venv}", target) == expected


@needs_make
def test_missing_or_stale_stamp_sets_up_first(venv):
    stamp = os.path.join(venv, STAMP_NAME)
    py = f"{venv}/bin/python"
    old = os.path.getmtime(LOCK) - 3600
    os.utime(stamp, (old, old))  # older than the lock: reinstall
    stale = _make_n(f"VENV={venv}", "PYTHON=python3.11", "test")
    os.remove(stamp)
    missing = _make_n(f"VENV={venv}", "PYTHON=python3.11", "test")
    assert stale == missing
    assert missing[0] == shlex.split(f"test -x {py} || python3.11 -m venv {venv}")
    for argv in (
        [py, "-m", "pip", "install", "-q", "-r", "requirements-lock.txt"],
        [py, "-m", "pip", "install", "-q", "--no-deps", "-e", "."],
    ):
        assert argv in missing, missing
    assert missing[-2:] == [["touch", stamp], [py, *PYTEST]]


@needs_make
def test_pytest_args_and_workdir_are_passed_through(venv):
    py = f"{venv}/bin/python"
    out = _make_n(f"VENV={venv}", "PYTEST_ARGS=-m 'not slow'", "test")
    assert out == [[py, *PYTEST, "-m", "not slow"]]
    out = _make_n(f"VENV={venv}", "WORKDIR=/tmp/d", "demo")
    assert out == [[py, *DEMO[:-1], "--workdir=/tmp/d"]]


@needs_make
def test_current_venv_is_not_reinstalled():
    """Under `make test` this venv carries a fresh stamp: make runs pytest and nothing else."""
    stamp = Path(sys.prefix) / STAMP_NAME
    newest = max(os.path.getmtime(ROOT / f) for f in ("requirements-lock.txt", "setup.py"))
    if not stamp.is_file() or stamp.stat().st_mtime < newest:
        pytest.skip("this venv was not set up by make (no fresh stamp); `make test` runs this")
    assert _make_n(f"VENV={sys.prefix}", "test") == [[f"{sys.prefix}/bin/python", *PYTEST]]


@needs_make
def test_make_help_is_the_default():
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_ENV}
    proc = subprocess.run([MAKE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for target in ("make demo", "make test", "make lint"):
        assert target in proc.stdout


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line!r}"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_lock_pins_torch_without_local_label_and_ruff_within_the_test_extra():
    pins = _lock()
    assert pins["torch"] == "2.13.0"  # no +cpu: see README "Quick start"
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    extras = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXTRAS_REQUIRE"
    )
    test_extra = {Requirement(r).name: Requirement(r) for r in extras["test"]}
    assert str(test_extra["torch"].specifier) == "==2.13.0"
    assert test_extra["ruff"].specifier.contains(pins["ruff"])


@pytest.mark.slow
def test_pip_resolves_the_lock_as_written(tmp_path):
    """This machine's path: pip offered a local 2.13.0+cpu wheel, which `torch==2.13.0` takes.

    Resolves every pin against this machine's pip configuration (its indexes and local
    wheels) without installing. The other path, a machine with no local wheel, is checked
    below only as far as the public index listing 2.13.0 without a label: installing that
    build (CUDA, several GB) or PyTorch's CPU index is out of reach of a test here.
    """
    report = tmp_path / "r.json"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
        + ["--report", str(report), "-r", str(LOCK)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
    resolved = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, version in _lock().items():
        assert Version(resolved[name]).public == Version(version).public, name
    torch = Version(resolved["torch"])
    assert torch.public == "2.13.0" and torch.local in (None, "cpu"), torch
    print(f"lock resolved in {time.time() - t0:.1f} s; torch {torch}")


@pytest.mark.slow
def test_public_index_serves_label_free_torch():
    """Where no +cpu wheel is offered, `torch==2.13.0` needs the public build for this Python.

    pip without this machine's configuration (no local wheels, no extra indexes, no
    constraints) lists the versions its default index has for this platform.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT")
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf at all
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "torch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Available versions:"))
    versions = [v.strip() for v in line.partition(":")[2].split(",")]
    assert "2.13.0" in versions, line


@pytest.mark.slow
def test_readme_model_example_runs():
    # The README's "one door" example, run as written.
    text = README.read_text(encoding="utf-8")
    start = text.index("### The model: one door")
    block = text[text.index("```python\n", start) + len("```python\n") :]
    block = block[: block.index("```")]
    scope: dict = {}
    exec(compile(block, "README.md:one-door", "exec"), scope)
    assert scope["scores"].shape == (2, 3)
    assert scope["logits"].shape == (2, 2) and np.isfinite(float(scope["loss"]))


@pytest.mark.slow
def test_demo_command_trains_and_evaluates(tmp_path):
    # What `make demo` runs (test_fresh_stamp_runs_only_the_command checks that it is this),
    # into a fresh workdir: the synthetic set is made and built, the model trains, the
    # evaluation writes the documented results and the report.
    workdir = tmp_path / "demo"
    argv = [a.replace("workdir/demo", str(workdir)) for a in DEMO]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as `make demo` runs in a user's shell
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == {"t2v", "v2t", "t2v_sk", "v2t_sk", "num_texts", "num_videos", "step"}
    assert results["num_texts"] == 100 and results["num_videos"] == 100
    # Chance is 1 % R@1; the demo reaches 30-40 % (docs/train.md), so it really learned.
    assert results["t2v"]["R@1"] >= 15 and results["v2t"]["R@1"] >= 15
    assert (workdir / "report" / "index.html").exists()


def _makefile_default(name: str) -> str:
    """The value of ``NAME = value`` in the Makefile (its default)."""
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            return value.strip()
    raise AssertionError(f"Makefile sets no {name}")


def test_readme_search_commands_run_in_what_make_demo_leaves():
    """README "Search your videos" works as written after `make demo`: it starts with that,
    then runs the interpreter of the virtualenv make set up (no `source .venv/bin/activate`
    needed; a bare `python` would not find jax), on the demo's workdir. The commands
    themselves run in tests/test_search.py (test_readme_search_section_runs_as_written)."""
    venv, workdir = _makefile_default("VENV"), _makefile_default("WORKDIR")
    commands = _code_blocks(_section("Search your videos"))[0]  # the shell block
    assert commands[0] == ["make", "demo"], commands[0]
    search = commands[1:]
    assert len(search) == 4, commands
    for argv in search:
        assert argv[:3] == [f"{venv}/bin/python", "-m", "ucofia_jax.search"], argv
        index = argv[argv.index("--index") + 1]
        assert index == f"{workdir}/videos.ucofia", argv
    first = search[0]
    assert first[3] == "index" and first[first.index("--workdir") + 1] == workdir, first
