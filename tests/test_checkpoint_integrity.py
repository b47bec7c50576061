"""Checkpoints notice damage (issue 21, item 4): a checksum of every array is written at save
and compared at restore, so bits flipped in an Orbax data file (same size) are named and the
run falls back to the previous checkpoint, as for a truncated file."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ucofia_jax import errors
from ucofia_jax.training import checkpoints


def _state(seed: int, moments: bool = True):
    """A small train-state-like tree with every dtype a real one holds (and bfloat16);
    ``moments=False`` leaves the optimizer state empty (the params' bytes are the most)."""
    rng = np.random.default_rng(seed)
    state = {
        "step": jnp.asarray(seed, jnp.int32),
        "params": {
            "dense": {"kernel": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)},
            "half": jnp.asarray(rng.normal(size=(33,)), jnp.bfloat16),
        },
        "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)},
        "rng": jax.random.PRNGKey(seed),
    }
    if not moments:
        state["opt_state"] = {}
    return state


def _data_files(step_dir):
    return sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")))


def _flip_bits(step_dir):
    """Flip bits of 4 bytes in the middle of the largest data file; its size is unchanged."""
    big = max(_data_files(step_dir), key=os.path.getsize)
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        f.seek(size // 2)
        chunk = bytearray(f.read(4))
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))
    assert os.path.getsize(big) == size
    return big


def _saved_run(workdir, moments=True):
    ck = checkpoints.Checkpointer(str(workdir), keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(step, moments), {"step": step})
    ck.close()


def _same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_flipped_bits_are_named_and_the_previous_checkpoint_restored(tmp_path, caplog):
    _saved_run(tmp_path)
    _flip_bits(os.path.join(tmp_path, "checkpoints", "2"))
    ck = checkpoints.Checkpointer(str(tmp_path), keep=3)
    try:
        with caplog.at_level(logging.WARNING):
            state, meta = ck.restore_latest(_state(0))
    finally:
        ck.close()
    assert meta["step"] == 1 and _same(state, _state(1))
    warned = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith("checkpoint 2 in ") and "trying step 1" in warned[0]
    assert "differ from the checksums written at save" in warned[0]
    assert "\n" not in warned[0]
    aside = os.listdir(os.path.join(tmp_path, checkpoints.DAMAGED_DIR))
    assert len(aside) == 1 and aside[0].startswith("2-")


def test_without_verification_the_flip_goes_unnoticed(tmp_path, monkeypatch):
    """The wrong variant of the test above: checksums not compared. The damaged step 2 is
    restored silently with other values, so the flip is caught by the checksums alone (not
    by Orbax, the finite check or a decompression error)."""
    _saved_run(tmp_path)
    _flip_bits(os.path.join(tmp_path, "checkpoints", "2"))
    monkeypatch.setattr(checkpoints, "verify_checksums", lambda *a, **k: None)
    ck = checkpoints.Checkpointer(str(tmp_path), keep=3)
    try:
        state, meta = ck.restore_latest(_state(0))
    finally:
        ck.close()
    assert meta["step"] == 2 and not _same(state, _state(2))


def test_params_only_restore_refuses_a_damaged_step(tmp_path):
    _saved_run(tmp_path, moments=False)  # the flip lands in a parameter
    _flip_bits(os.path.join(tmp_path, "checkpoints", "2"))
    step_dir = os.path.join(tmp_path, "checkpoints", "2")
    with pytest.raises(errors.CheckpointError, match="differ from the checksums"):
        checkpoints.restore_params(step_dir, _state(0)["params"])
    params, meta = checkpoints.restore_params(str(tmp_path), _state(0)["params"])
    assert meta["step"] == 1 and _same(params, _state(1)["params"])


def test_a_checkpoint_without_checksums_restores_unchecked(tmp_path):
    """Checkpoints written before the checksums existed still resume."""
    _saved_run(tmp_path)
    for step in (1, 2):
        os.remove(os.path.join(tmp_path, "checkpoints", str(step), "checksums", "metadata"))
    ck = checkpoints.Checkpointer(str(tmp_path), keep=3)
    try:
        state, meta = ck.restore_latest(_state(0))
    finally:
        ck.close()
    assert meta["step"] == 2 and _same(state, _state(2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32, jnp.bool_])
def test_every_single_bit_flip_changes_the_checksum(dtype):
    rng = np.random.default_rng(0)
    base = np.asarray(jnp.asarray(rng.normal(size=(5, 7)) * 50, dtype))
    ref = checkpoints.state_checksums({"x": base})["x"]
    raw = base.reshape(-1).view(np.uint8).copy()
    for byte in range(raw.size):
        for bit in range(8):
            if dtype == jnp.bool_ and bit:  # a bool's other bits are not values
                continue
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            value = flipped.view(base.dtype).reshape(base.shape)
            assert checkpoints.state_checksums({"x": value})["x"] != ref, (byte, bit)


def test_swapped_elements_change_the_checksum():
    """Positions count: the same values in another order are another array."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = checkpoints.state_checksums({"x": x})["x"]
    assert checkpoints.state_checksums({"x": x.T.copy().reshape(3, 4)})["x"] != ref
    assert checkpoints.state_checksums({"x": x[::-1].copy()})["x"] != ref


def test_checksums_do_not_depend_on_the_sharding():
    """A state restored onto another mesh verifies against the checksums of its save."""
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 4 CPU devices)")
    x = np.random.default_rng(1).normal(size=(8, 12)).astype(np.float32)
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))
    layouts = [
        jax.device_put(x, devices[0]),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b"))),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, ("a", "b")))),
    ]
    sums = {checkpoints.state_checksums({"x": y})["x"] for y in layouts}
    assert len(sums) == 1, sums
