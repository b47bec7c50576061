"""notebooks/colab_tpu.ipynb runs top to bottom on CPU (the demo shrunk to a few steps).

The code cells are extracted and run as one script in a subprocess (the notebook keeps no
IPython magics outside the cells tagged ``colab``, which hold the Colab-only installs and
Drive/bucket mounts and are skipped here). ``UCOFIA_NOTEBOOK_SMOKE=1`` makes the parameter
cell shrink the demo; the workdir is a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _env import one_device_env

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"


def _cells():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    return nb["cells"]


def _tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


def _source(cell):
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def notebook_script() -> str:
    parts = []
    for i, cell in enumerate(_cells()):
        if cell["cell_type"] != "code" or "colab" in _tags(cell):
            continue
        parts.append(f"# ---- cell {i}\n{_source(cell)}\n")
    return "\n".join(parts)


def test_notebook_structure():
    cells = _cells()
    code = [c for c in cells if c["cell_type"] == "code"]
    assert sum("parameters" in _tags(c) for c in code) == 1
    colab = [c for c in code if "colab" in _tags(c)]
    assert any("pip" in _source(c) for c in colab)  # install
    assert any("drive.mount" in _source(c) for c in colab)  # real-data storage
    text = "".join(_source(c) for c in cells)
    for needle in (
        "configs/demo.py",
        "configs/msrvtt.py",
        "REPO_URL",
        "-e",
        "results.json",
        "--mode=eval",
        "launch.sh",
    ):
        assert needle in text, needle
    for c in code:
        if "colab" in _tags(c):
            continue
        for line in _source(c).splitlines():  # runnable as plain python
            assert not line.lstrip().startswith(("!", "%")), line
        compile(_source(c), "<cell>", "exec")
    for c in code:
        assert c.get("outputs", []) == [] and c.get("execution_count") is None, "strip outputs"


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(notebook_script())
    workdir = tmp_path / "work"
    env = one_device_env()  # a plain single-host run
    env.update(
        UCOFIA_NOTEBOOK_SMOKE="1",
        UCOFIA_NOTEBOOK_WORKDIR=str(workdir),
        PYTHON=sys.executable,
        JAX_PLATFORMS="cpu",
        MPLBACKEND="Agg",
    )
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO / "notebooks",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "devices:" in out and "backend: cpu" in out
    results = json.loads((workdir / "results.json").read_text())
    assert {"t2v", "v2t"} <= set(results) and "R@1" in results["t2v"]
    assert "t2v      R@1=" in out or "t2v     R@1=" in out
    assert "Set RUN_REAL_DATA = True" in out
    for name in ("recall_at_k.png", "similarity.png", "results.md"):  # the report was shown
        assert f"== report/{name}" in out or f"== {name}" in out, name
    print(f"notebook: {time.time() - t0:.1f} s")
