"""Two real processes (2 virtual CPU devices each, gloo collectives) == one process x 4 devices.

Both runs go through ``launch.sh``: ``cpu-multiprocess 2 --devices-per-process=2`` and
``local --cpu --cpu-devices=4``; this file is also the program they run (``__main__``
below), so the multi-process path is exercised exactly as users launch it.

* ``mechanics``: a contrastive loss over a global batch sharded on ``data`` (global
  negatives through XLA's all-gathers) and a few SGD steps on a replicated weight; each
  process feeds only its rows via ``make_array_from_process_local_data``. Its companion
  (``--feed=swapped``) feeds each process the other's rows and checks the comparison fails.
* ``train``: the package's own train step and evaluation (ucofia_jax.training.trainer /
  ucofia_jax.evaluation.evaluator) on the demo config shrunk to a tiny model: loss
  trajectory, params checksum and retrieval metrics.

Tolerances: the global arrays hold the same values in the same device order in both
layouts, but the cross-process reductions go through gloo instead of the in-process CPU
collectives, so sums may associate differently: rtol 1e-5 / atol 1e-6 on losses and
parameters (float32), and metrics (ranks) equal.

Imports: everything at the top. Importing jax starts no backend; launch.sh sets XLA_FLAGS
(the virtual device count) and the UCOFIA_* variables before python starts, and ``main``
calls ``distributed.maybe_initialize`` before anything asks for a device.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_data import ArrayData
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import demo
from data_pipeline import pipeline
from ucofia_jax.evaluation import evaluator
from ucofia_jax.models.model import Model
from ucofia_jax.runtime import distributed, sharding
from ucofia_jax.training import checkpoints, loop
from ucofia_jax.training import trainer as train_lib
from ucofia_jax.training.metric_writer import MetricWriter

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"


# =========================================================================== the program


def _mechanics(out: Path, feed: str = "mesh") -> dict:
    """``feed="swapped"``: each process feeds the rows of the other (deliberately wrong, for
    the companion test)."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    global_batch, dim, steps = 16, 8, 4
    texts = rng.standard_normal((steps, global_batch, dim)).astype(np.float32)
    videos = rng.standard_normal((steps, global_batch, dim)).astype(np.float32)
    w0 = (np.eye(dim) + 0.1 * rng.standard_normal((dim, dim))).astype(np.float32)
    replicated = NamedSharding(mesh, P())
    batch_sh = NamedSharding(mesh, P("data", None))
    rows = distributed.local_batch_slice(global_batch, NamedSharding(mesh, P("data")))
    if feed == "swapped":
        other = (jax.process_index() + 1) % jax.process_count()
        rows = distributed.process_rows(global_batch, NamedSharding(mesh, P("data")), other)

    def loss_fn(w, t, v):
        t = t @ w
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        logits = 10.0 * t @ v.T  # [global, global]: every negative in the global batch
        labels = jnp.arange(logits.shape[0])
        lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1).mean()
        lv = -jnp.take_along_axis(jax.nn.log_softmax(logits, 0), labels[None, :], 0).mean()
        return (lt + lv) / 2

    def step(w, t, v):
        loss, g = jax.value_and_grad(loss_fn)(w, t, v)
        return w - 0.5 * g, loss, (t @ v.T).sum(1)

    step = jax.jit(
        step,
        in_shardings=(replicated, batch_sh, batch_sh),
        out_shardings=(replicated, replicated, NamedSharding(mesh, P("data"))),
    )
    w = jax.device_put(w0, replicated)
    losses = []
    for s in range(steps):
        t, v = distributed.global_batch_from_local((texts[s][rows], videos[s][rows]), batch_sh)
        assert t.shape == (global_batch, dim), t.shape
        w, loss, rowsum = step(w, t, v)
        losses.append(float(loss))
    gathered = distributed.to_host(rowsum)  # sharded over processes -> whole on every host

    # Orbax from every process: a replicated and a 'data'-sharded array, saved and restored.
    ckpt = ocp.StandardCheckpointer()
    path = (out / "ckpt").absolute()
    ckpt.save(path, {"w": w, "rowsum": rowsum})
    ckpt.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"w": w, "rowsum": rowsum},
    )
    restored = ckpt.restore(path, abstract)
    assert restored["rowsum"].sharding == rowsum.sharding
    np.testing.assert_array_equal(distributed.to_host(restored["rowsum"]), gathered)
    np.testing.assert_array_equal(distributed.to_host(restored["w"]), distributed.to_host(w))
    ckpt.close()
    return {
        "losses": losses,
        "w": np.asarray(distributed.to_host(w)).tolist(),
        "rowsum": np.asarray(gathered).tolist(),
        "rows": np.asarray(np.arange(global_batch)[rows]).tolist(),
    }


def tiny_config():
    """configs/demo.py shrunk to seconds: 1-layer towers, 2 frames of 24 px, batch 8."""
    c = demo.get_config()
    c.model.clip.update(
        dict(
            embed_dim=32,
            image_resolution=24,
            vision_layers=1,
            vision_width=32,
            vision_patch_size=8,
            text_width=32,
            text_heads=1,
            text_layers=1,
            token_shift_blocks=(0,),
            vocab_size=512,
            context_length=16,
        )
    )
    c.model.head.update(dict(num_samples=8, seq_layers=1))
    c.data.update(dict(max_words=8, max_frames=2, image_size=24))
    c.train.update(
        dict(
            batch_size=8,
            epochs=1,
            num_steps=4,
            log_every_steps=1,
            checkpoint_every_steps=2,
            keep_checkpoints=1,
            lr=3e-3,
            clip_lr=3e-3,
        )
    )
    c.eval.update(
        dict(batch_size=8, text_block=8, video_block=8, sk_bank_size=16, sk_v2t_bank_size=8)
    )
    c.mesh.data = -1
    return c


def tiny_arrays(config, n: int, seed: int):
    rng = np.random.default_rng(seed)
    w, f, s = config.data.max_words, config.data.max_frames, config.data.image_size
    ids = rng.integers(1, config.model.clip.vocab_size - 1, (n, w)).astype(np.int32)
    ids[:, -1] = config.model.clip.vocab_size - 1  # EOT = argmax
    return {
        "input_ids": ids,
        "frames": rng.integers(0, 256, (n, f, s, s, 3)).astype(np.uint8),
        "frame_mask": np.ones((n, f), np.int32),
        "video_index": np.arange(n),
    }


class LocalRows:
    """Global batches -> this process's rows (what a per-process input pipeline yields)."""

    def __init__(self, data, rows: slice):
        self.data, self.rows = data, rows
        self.steps_per_epoch = data.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0):
        for batch in self.data.epoch(epoch, start_step):
            yield {k: v[self.rows] for k, v in batch.items()}


def _train(out: Path) -> dict:
    config = tiny_config()
    model = Model.from_config(
        config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
    )
    mesh = sharding.make_mesh(config.mesh)
    state = train_lib.create_train_state(model, config.seed)
    total = int(config.train.num_steps)
    trainer = train_lib.make_trainer(
        model, config.train, mesh, state, total, axis_rules=config.mesh.logical_axis_rules
    )
    state = train_lib.place_state(trainer, state)

    recorded = []
    step_fn = trainer.train_step

    def recording_step(state, batch):
        state, metrics = step_fn(state, batch)
        recorded.append(metrics)
        return state, metrics

    trainer.train_step = recording_step

    gb = int(config.train.batch_size)
    data = ArrayData(tiny_arrays(config, 4 * gb, seed=1), gb, seed=config.seed)
    rows = distributed.local_batch_slice(gb, sharding=sharding.batch_sharding(mesh, 1))
    workdir = (out / "workdir").absolute()
    ckpt = checkpoints.Checkpointer(str(workdir), keep=1)
    writer = MetricWriter(str(workdir), enabled=distributed.is_main_process())
    state = loop.train_loop(
        trainer,
        state,
        LocalRows(data, rows),
        total_steps=total,
        checkpointer=ckpt,
        writer=writer,
        progress=False,
    )
    writer.close()
    ckpt.wait()
    losses = [float(m["loss"]) for m in jax.device_get(recorded)]

    params = distributed.to_host(state["params"])
    flat = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(params)])
    np.save(out / f"params_{jax.process_index()}.npy", flat)

    # Orbax restored the sharded state on every process: equal to the live one.
    restored, meta = ckpt.restore(state)
    rflat = np.concatenate(
        [
            np.ravel(x).astype(np.float64)
            for x in jax.tree.leaves(distributed.to_host(restored["params"]))
        ]
    )
    np.testing.assert_array_equal(rflat, flat)
    ckpt.close()
    result = {
        "losses": losses,
        "rows": [rows.start, rows.stop],
        "step": int(meta["step"]),
        "params_sum": float(flat.sum()),
        "params_abs_sum": float(np.abs(flat).sum()),
        "num_params": int(flat.size),
        "writer_enabled": writer.enabled,
    }
    distributed.sync("log written")
    result["log_starts"] = (workdir / "log.txt").read_text().count("training from step")
    result.update(_evaluate(model, config, mesh, state, out))
    return result


class ArrayVideoText:
    """In-memory split with the eval interface of ``data_pipeline.pipeline.VideoTextData``:
    each process yields its columns of every padded global batch (``eval_plan`` /
    ``shard_plan``), one caption per video."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.num_videos = self.num_texts = len(arrays["input_ids"])
        self.text_to_video = np.arange(self.num_texts)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()

    def _plan(self, n, global_batch, limit, seed):
        order = pipeline.VideoTextData._subset(n, limit, seed)
        index, valid = pipeline.eval_plan(len(order), global_batch)
        return (
            pipeline.shard_plan(order[index], self.process_index, self.process_count),
            pipeline.shard_plan(valid, self.process_index, self.process_count),
        )

    def eval_text_batches(self, *, global_batch, limit=None, seed=0):
        for t, v in zip(*self._plan(self.num_texts, global_batch, limit, seed)):
            yield {
                "input_ids": self.arrays["input_ids"][t],
                "text_index": t,
                "video_index": self.text_to_video[t],
                "valid": v,
            }

    def eval_video_batches(self, *, global_batch, limit=None, seed=0):
        for t, v in zip(*self._plan(self.num_videos, global_batch, limit, seed)):
            yield {
                "frames": self.arrays["frames"][t],
                "frame_mask": self.arrays["frame_mask"][t],
                "video_index": t,
                "valid": v,
            }

    def text_bank(self, size=None, seed=0):
        t = pipeline.VideoTextData._subset(self.num_texts, size, seed)
        return {
            "input_ids": self.arrays["input_ids"][t],
            "text_index": t,
            "video_index": self.text_to_video[t],
        }


def _evaluate(model, config, mesh, state, out: Path) -> dict:
    """The package's evaluation (encoders, blockwise levels, SK-norm) on a 12-clip test split
    with a 16-text / 8-video query bank from the training arrays; eval batch 8 over 4 devices,
    so the last batch is padded."""
    test = ArrayVideoText(tiny_arrays(config, 12, seed=2))
    bank = ArrayVideoText(tiny_arrays(config, 32, seed=1))
    fns = evaluator.retrieval_fns(model, mesh, config.eval)
    res = evaluator.evaluate(
        fns,
        state["params"],
        mesh,
        config.eval,
        test,
        train_data=bank,
        rng=jax.random.PRNGKey(5),
        step=int(config.train.num_steps),
    )
    keep = {
        k: res.metrics[k]
        for k in ("t2v", "v2t", "t2v_sk", "v2t_sk", "num_texts", "num_videos")
        if k in res.metrics
    }
    np.save(out / f"similarity_{jax.process_index()}.npy", np.asarray(res.similarity))
    return keep


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=["mechanics", "train"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--feed", choices=["mesh", "swapped"], default="mesh")
    args = parser.parse_args(argv)

    if os.environ.get("UCOFIA_TEST_TRACEBACK_AFTER"):  # debugging a hang: dump every thread
        faulthandler.dump_traceback_later(float(os.environ["UCOFIA_TEST_TRACEBACK_AFTER"]))
    up = distributed.maybe_initialize()  # before anything asks jax for its devices
    distributed.setup_logging()
    if args.task == "mechanics":
        result = _mechanics(Path(args.out), args.feed)
    else:
        result = _train(Path(args.out))
    result.update(
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        distributed=up,
        collectives=str(jax.config.jax_cpu_collectives_implementation),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every process writes its own view: the test checks they agree (all hosts see the
    # gathered metrics); process 0's file is "the" result.
    (out / f"process_{jax.process_index()}.json").write_text(json.dumps(result))
    distributed.sync("done")


# =========================================================================== the tests


def test_settings_from_env_and_config():
    d = distributed
    s = d.settings_from_env(
        {
            "UCOFIA_COORDINATOR": "10.0.0.1:1234",
            "UCOFIA_NUM_PROCESSES": "4",
            "UCOFIA_PROCESS_ID": "3",
            "UCOFIA_LOCAL_DEVICE_IDS": "0,1",
        }
    )
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.1:1234",
        4,
        3,
        (0, 1),
    )
    assert s.mode == "auto" and s.validate() is s
    # config.distributed.mode and flags override the environment
    cfg = {"distributed": {"mode": "off"}}
    assert d._merge(s, cfg).mode == "off"
    assert d._merge(s, {"distributed_mode": "on", "process_id": 2}).process_id == 2
    # off / auto-without-cluster: nothing happens (and nothing touches jax.distributed)
    assert d.maybe_initialize(cfg, env={}) is False
    assert d.maybe_initialize(env={}) is False
    assert (
        d.maybe_initialize(
            env={"UCOFIA_COORDINATOR": "h:1", "UCOFIA_NUM_PROCESSES": "1", "UCOFIA_PROCESS_ID": "0"}
        )
        is False
    )
    with pytest.raises(ValueError, match="UCOFIA_NUM_PROCESSES, UCOFIA_PROCESS_ID"):
        d.maybe_initialize(env={"UCOFIA_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match="host:port"):
        d.settings_from_env(
            {"UCOFIA_COORDINATOR": "h", "UCOFIA_NUM_PROCESSES": "2", "UCOFIA_PROCESS_ID": "0"}
        ).validate()
    with pytest.raises(ValueError, match="not in"):
        d.DistributedSettings(
            mode="auto", coordinator_address="h:1", num_processes=2, process_id=2
        ).validate()
    with pytest.raises(ValueError, match="mode"):
        d.maybe_initialize(env={"UCOFIA_DISTRIBUTED": "yes"})
    srun = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert d._slurm_multi_task({**srun, "SLURM_STEP_NUM_TASKS": "8"})
    assert not d._slurm_multi_task(srun)  # the batch script itself: one process
    assert not d._slurm_multi_task({**srun, "SLURM_STEP_NUM_TASKS": "1"})
    assert d._tpu_multi_worker({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not d._tpu_multi_worker({"TPU_WORKER_HOSTNAMES": "localhost"})


def test_single_process_helpers():
    d = distributed
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows_sh = NamedSharding(mesh, P("data"))
    n = len(jax.devices())
    assert d.is_main_process() and d.local_batch_slice(4 * n, rows_sh) == slice(0, 4 * n)
    assert d.local_batch_slice(4 * n) == slice(0, 4 * n)
    x = np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3)
    with pytest.raises(TypeError, match="Sharding"):  # a mesh is no longer accepted
        d.local_batch_slice(4 * n, mesh)
    with pytest.raises(TypeError, match="Sharding"):
        d.global_batch_from_local({"x": x}, mesh)
    g = d.global_batch_from_local({"x": x}, rows_sh)["x"]
    assert g.shape == x.shape and len(g.sharding.device_set) == n
    np.testing.assert_array_equal(d.to_host(g), x)
    np.testing.assert_array_equal(d.process_allgather(g), x)
    assert d.process_allgather(np.ones(2), tiled=False).shape == (1, 2)
    # one process holds every row of the batch, however it is split or replicated
    for axes in (("data",), ("model",)):
        grid = Mesh(np.array(jax.devices()), axes)
        batch_sh = NamedSharding(grid, P("data") if axes == ("data",) else P())
        np.testing.assert_array_equal(d.process_rows(4 * n, batch_sh), np.arange(4 * n))
        assert d.global_batch_from_local({"x": x}, batch_sh)["x"].shape == x.shape
        with pytest.raises(ValueError, match="process 1 holds no device"):
            d.process_rows(4 * n, batch_sh, process=1)
    d.sync("noop")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    # launch.sh sets the device count per process; LLVM -O0 halves the compile time of the
    # train step on a busy 2-core machine (both runs get the same flags).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["PYTHON"] = sys.executable
    env["UCOFIA_INIT_TIMEOUT"] = "120"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Own session: on a timeout the whole group (launch.sh and its processes) gets SIGKILL.
    return subprocess.Popen(
        ["bash", str(LAUNCH), *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{proc.args} timed out:\n{log.read_text()[-6000:]}") from None
    assert proc.returncode == 0, f"{proc.args} failed:\n{log.read_text()[-8000:]}"


def _run_both(
    task: str, tmp_path: Path, timeout: float = 420, multi_args: tuple = ()
) -> tuple[dict, dict, list[dict]]:
    """The 2 x 2 run (with ``multi_args`` added) and the 1 x 4 run, concurrently (each is
    mostly single-threaded compile)."""
    entry = f"--entry={Path(__file__).resolve()}"
    multi, single = tmp_path / "multi", tmp_path / "single"
    runs = [
        (
            _start(
                [
                    "cpu-multiprocess",
                    "2",
                    "--devices-per-process=2",
                    entry,
                    "--",
                    f"--task={task}",
                    f"--out={multi}",
                    *multi_args,
                ],
                tmp_path / "multi.log",
            ),
            tmp_path / "multi.log",
        ),
        (
            _start(
                [
                    "local",
                    "--cpu",
                    "--cpu-devices=4",
                    entry,
                    "--",
                    f"--task={task}",
                    f"--out={single}",
                ],
                tmp_path / "single.log",
            ),
            tmp_path / "single.log",
        ),
    ]
    deadline = time.time() + timeout
    try:
        for proc, log in runs:
            _finish(proc, log, deadline)
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    views = [json.loads((multi / f"process_{i}.json").read_text()) for i in range(2)]
    return views[0], json.loads((single / "process_0.json").read_text()), views


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
    )


@pytest.mark.slow
def test_mechanics_two_processes_equal_one(tmp_path):
    t0 = time.time()
    multi, single, views = _run_both("mechanics", tmp_path)
    assert multi["process_count"] == 2 and multi["device_count"] == 4
    assert multi["local_device_count"] == 2 and multi["distributed"] is True
    assert multi["collectives"] == "gloo"
    assert single["process_count"] == 1 and single["device_count"] == 4
    assert single["distributed"] is False
    # each process read its own half of the batch
    assert [v["rows"] for v in views] == [list(range(8)), list(range(8, 16))]
    assert single["rows"] == list(range(16))
    _assert_same_mechanics(views, single)
    assert single["losses"][-1] < single["losses"][0]  # it trains
    print(f"mechanics: losses {single['losses']}  ({time.time() - t0:.1f} s)")


def _assert_same_mechanics(views: list[dict], single: dict) -> None:
    for view in views:
        _close(view["losses"], single["losses"])
        _close(view["w"], single["w"])
        _close(view["rowsum"], single["rowsum"])


@pytest.mark.slow
def test_mechanics_comparison_catches_swapped_shards(tmp_path):
    """Companion: each process feeds the other's rows. Texts and videos move together, so the
    contrastive loss and the weight do not change; the per-row output (rowsum) does, and the
    comparison must fail on it."""
    multi, single, views = _run_both("mechanics", tmp_path, multi_args=("--feed=swapped",))
    assert [v["rows"] for v in views] == [list(range(8, 16)), list(range(8))]
    with pytest.raises(AssertionError):
        _assert_same_mechanics(views, single)


@pytest.mark.slow  # compiles the train step in 3 processes: ~2 min on a busy 2-core machine
def test_train_and_eval_two_processes_equal_one(tmp_path):
    t0 = time.time()
    multi, single, views = _run_both("train", tmp_path)
    assert (
        multi["process_count"],
        multi["device_count"],
        single["process_count"],
        single["device_count"],
    ) == (2, 4, 1, 4)
    assert [v["rows"] for v in views] == [[0, 4], [4, 8]] and single["rows"] == [0, 8]
    assert len(single["losses"]) == 4 and single["step"] == 4
    # only process 0 writes the log
    assert views[0]["writer_enabled"] and not views[1]["writer_enabled"]
    assert views[0]["log_starts"] == views[1]["log_starts"] == single["log_starts"] == 1
    for view in views:
        _close(view["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    p_single = np.load(tmp_path / "single" / "params_0.npy")
    for i in range(2):
        # atol 5e-6: Adam divides by sqrt(v), so a parameter whose gradient is ~0 moves by
        # rounding-sized amounts whose sign depends on the summation order (2 processes vs
        # 1); seen: one of 71,669 entries 1.2e-6 apart after 4 steps on an AMD EPYC host.
        _close(np.load(tmp_path / "multi" / f"params_{i}.npy"), p_single, rtol=1e-4, atol=5e-6)
    diff = np.abs(np.load(tmp_path / "multi" / "params_0.npy") - p_single).max()
    # evaluation: same similarity matrix (to float32 rounding) and the same metrics everywhere
    assert single["num_texts"] == single["num_videos"] == 12
    sim = np.load(tmp_path / "single" / "similarity_0.npy")
    assert sim.shape == (12, 12)
    for i in range(2):
        _close(np.load(tmp_path / "multi" / f"similarity_{i}.npy"), sim, rtol=1e-4, atol=1e-5)
    for key in ("t2v", "v2t", "t2v_sk", "v2t_sk"):
        assert key in single, key
        for view in views:
            assert view[key] == single[key], (key, view[key], single[key])
    print(
        f"train: losses {single['losses']}, max |param diff| {diff:.2e}, "
        f"{single['num_params']} params ({time.time() - t0:.1f} s)"
    )


def test_setup_logging_quiets_and_prefixes_other_processes(monkeypatch):
    d = distributed
    root = logging.getLogger()
    handler = logging.StreamHandler()
    old_level, old_handlers = root.level, list(root.handlers)
    root.handlers = [handler]
    try:
        monkeypatch.setattr(jax, "process_index", lambda: 2)
        d.setup_logging()
        assert root.level == logging.WARNING
        line = handler.format(
            logging.LogRecord("x", logging.WARNING, "f", 1, "disk full", None, None)
        )
        assert line == "[process 2] WARNING disk full"
        monkeypatch.setattr(jax, "process_index", lambda: 0)
        logging.getLogger("orbax").setLevel(logging.WARNING)
        d.setup_logging()
        assert root.level == logging.INFO
        assert logging.getLogger("orbax").level == logging.WARNING  # quieted loggers stay quiet
    finally:
        root.handlers, _ = old_handlers, root.setLevel(old_level)


if __name__ == "__main__":
    main(sys.argv[1:])
