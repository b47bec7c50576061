"""Batches that follow the mesh: 2 processes x 2 CPU devices == 1 process x 4 devices.

``tests/_mesh_worker.py`` reads a built dataset through ``VideoTextData(..., mesh=mesh)``
and assembles the global batches as the train loop does, on ``mesh.data=1, mesh.model=4``
(the batch replicated over a ``model`` axis that spans both processes) and on
``mesh.data=2, mesh.fsdp=2``. Both runs go through ``launch.sh`` (``cpu-multiprocess 2
--devices-per-process=2`` and ``local --cpu --cpu-devices=4``) at the same time, once per
module. Compared: every global batch (exactly), the losses (rtol 1e-5) and the weights after
two SGD steps (rtol 1e-5 / atol 1e-6: gloo sums in another order than the in-process
collectives).

The companion feeds the 2-process run wrongly on purpose and checks the same comparison
fails: the rows ``[p*b, (p+1)*b)`` on the ``model=4`` mesh (the pipeline's old rule: each
process then holds half of an array meant to be identical on all four devices, a global
batch of 4 rows instead of 8), and swapped rows on the ``fsdp=2`` mesh (the same rows in
another order: the contrastive loss and its gradient do not change, only the batch
comparison sees it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from _mesh_worker import FRAMES, GLOBAL_BATCH, MESHES, SIZE, data_config, init_params
from test_multiprocess import _finish, _start

from data_pipeline import build as build_lib
from data_pipeline import synthetic
from data_pipeline.sampling import FrameSampling

WORKER = Path(__file__).resolve().parent / "_mesh_worker.py"
STEPS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(2-process output, 1-process output); the 2-process run also holds the wrong feeds."""
    root = tmp_path_factory.mktemp("mesh_batches")
    raw, data_dir = root / "raw", root / "tfds"
    # 16 training clips: two global batches of 8.
    synthetic.make_synthetic_dataset(str(raw), num_train=16, num_test=6, frame_size=SIZE, seed=0)
    build_lib.build(
        "msrvtt",
        manual_dir=str(raw),
        data_dir=str(data_dir),
        sampling=FrameSampling.from_config(data_config(str(data_dir))),
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    multi, single = root / "multi", root / "single"
    common = [f"--entry={WORKER}", "--", f"--data_dir={data_dir}", f"--steps={STEPS}"]
    procs = [
        (
            _start(
                ["cpu-multiprocess", "2", "--devices-per-process=2", *common, f"--out={multi}"]
                + ["--variants=mesh,blocks,swapped"],
                root / "multi.log",
            ),
            root / "multi.log",
        ),
        (
            _start(
                ["local", "--cpu", "--cpu-devices=4", *common, f"--out={single}"],
                root / "single.log",
            ),
            root / "single.log",
        ),
    ]
    deadline = time.time() + 420
    try:
        for proc, log in procs:
            _finish(proc, log, deadline)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    return multi, single


def assert_same_run(multi: Path, single: Path, mesh: str, variant: str) -> None:
    """Every process of the 2-process run (fed as ``variant``) saw the global batches, losses
    and weights of the 1-process run."""
    want = np.load(single / f"{mesh}_mesh_0.npz")
    assert want["frames"].shape == (STEPS, GLOBAL_BATCH, FRAMES, SIZE, SIZE, 3)
    for process in range(2):
        got = np.load(multi / f"{mesh}_{variant}_{process}.npz")
        for key in ("video_index", "text_index", "input_ids", "frames"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of {mesh}")
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, atol=1e-6)
        for key in ("param_token_table", "param_video_proj"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        if variant == "mesh":  # the evaluator's encoding of the 6 test clips, padding dropped
            assert want["eval_text"].shape[0] == want["eval_video"].shape[0] == 6
            for key in ("eval_text", "eval_video"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow  # 3 processes compile 2 small steps per mesh: ~1 min on a busy 2-core machine
def test_two_processes_feed_the_mesh_rows(runs):
    multi, single = runs
    for mesh in MESHES:
        assert_same_run(multi, single, mesh, "mesh")
        got = np.load(single / f"{mesh}_mesh_0.npz")
        assert np.isfinite(got["losses"]).all()
        for key, start in init_params().items():  # the steps moved every weight
            assert np.abs(got[f"param_{key}"] - start).max() > 1e-3, key
    rows = {
        (mesh, p): np.load(multi / f"{mesh}_mesh_{p}.npz")["rows"].tolist()
        for mesh in MESHES
        for p in range(2)
    }
    every = list(range(GLOBAL_BATCH))
    # model=4 spans both processes: each holds (and reads) the whole batch
    assert rows["data1_model4", 0] == rows["data1_model4", 1] == every
    # data x fsdp = 4 rows blocks, two on each process's devices
    assert rows["data2_fsdp2", 0] == every[:4] and rows["data2_fsdp2", 1] == every[4:]


@pytest.mark.slow  # shares the runs of the test above
@pytest.mark.parametrize(
    "mesh,variant",
    [("data1_model4", "blocks"), ("data2_fsdp2", "swapped")],
)
def test_comparison_catches_a_wrong_feed(runs, mesh, variant):
    multi, single = runs
    with pytest.raises(AssertionError):
        assert_same_run(multi, single, mesh, variant)


@pytest.mark.slow  # shares the runs of the test above
@pytest.mark.parametrize(
    "mesh,variant",
    # The old rule is right where the batch is split over every device, and swapping is a
    # no-op where both processes hold every row: the comparison does not cry wolf.
    [("data2_fsdp2", "blocks"), ("data1_model4", "swapped")],
)
def test_comparison_accepts_feeds_that_are_right_for_the_mesh(runs, mesh, variant):
    multi, single = runs
    assert_same_run(multi, single, mesh, variant)
