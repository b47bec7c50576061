"""Mutation fuzz (hypothesis, fixed seed) of the two readers of untrusted pickles: a small valid
``.pt`` written by torch, and a valid MSVD ``raw-captions.pkl``.

Every mutated file must either load or be refused with the reader's named error
(CheckpointError / DataError); any other exception, a crash or a hang fails. The .pt reader
copies each view with ``as_strided`` after checking every index it can reach against the
storage, so the fuzz also guards that check: what a .pt load returns must consist only of
bytes of the file's storages (checked element by element), a random view must equal torch's
own checked ``as_strided`` of it (little- and big-endian files), and an unchanged pickle must
load to exactly the original tensors. Each case runs under an alarm, so a hang in Python code is a
failure with the case, not a stuck suite.
"""

import contextlib
import io
import math
import os
import pickle
import signal
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_torch_reader import craft, tensor_ops

from data_pipeline.datasets import msvd
from data_pipeline.records import SkipReport
from ucofia_jax.errors import CheckpointError, DataError
from ucofia_jax.models import torch_reader

CASES = 200
SECONDS_PER_CASE = 5
FUZZ = settings(
    max_examples=CASES,
    derandomize=True,  # a fixed seed: the same 200 files every run
    deadline=None,  # the alarm below bounds each case instead (robust on a loaded machine)
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# A mutation: (kind, position as a fraction of the length, byte value).
MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "interesting"]),
    st.integers(0, 2**16 - 1).map(lambda i: i / 2**16),
    st.integers(0, 255),
)
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, ord("("), ord("t"), ord("R"), ord("h"), ord("."))


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, where, value in mutations:
        if not b:
            break
        i = int(where * len(b))
        if kind == "flip":
            b[i] ^= 1 << (value % 8)
        elif kind == "set":
            b[i] = value
        elif kind == "insert":
            b.insert(i, value)
        elif kind == "delete":
            del b[i]
        else:
            b[i] = INTERESTING[value % len(INTERESTING)]
    return bytes(b)


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ .pt


@pytest.fixture(scope="module")
def valid_pt(tmp_path_factory):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100
    sd = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.5,
        "h": torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16),
        "t": base.T,  # non-contiguous view
        "row": base[1],  # offset into base's storage (shared with "t")
        "n": torch.arange(4),
    }
    path = str(tmp_path_factory.mktemp("fuzz") / "small.pt")
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    want = {k: v.numpy() for k, v in sd.items()}
    return path, entries, want


def _rezip(path, entries, pkl_name, pkl):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, pkl if name == pkl_name else data)


def _storage_chunks(entries, itemsize):
    """Every aligned ``itemsize``-byte element of every storage file of the zip."""
    out = set()
    for name, data in entries.items():
        if "/data/" in name:
            out.update(data[i : i + itemsize] for i in range(0, len(data) - itemsize + 1, itemsize))
    return out


def check_pt(path, entries, want, identical: bool):
    try:
        with time_limit(SECONDS_PER_CASE, path):
            got = torch_reader.read_torch_file(path)
    except CheckpointError as e:
        assert str(e).startswith(path), e  # the named error names the file
        assert not identical, f"the unchanged file was refused: {e}"
        return "refused"
    assert isinstance(got, dict) and all(isinstance(k, str) for k in got)
    if identical:
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)  # exact: stored values
        return "loaded"
    for name, arr in got.items():
        assert isinstance(arr, np.ndarray), name
        if arr.size:
            # Memory safety: each element is an element of some storage of the file.
            chunks = _storage_chunks(entries, arr.dtype.itemsize)
            raw = np.ascontiguousarray(arr).view(np.uint8).reshape(arr.size, arr.dtype.itemsize)
            stray = [bytes(r) for r in raw[:1000] if bytes(r) not in chunks]
            assert not stray, (name, arr.dtype, arr.shape, stray[:3])
    return "loaded"


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), target=st.integers(0, 9))
def test_fuzz_torch_file(valid_pt, tmp_path, mutations, target):
    src, entries, want = valid_pt
    path = str(tmp_path / "m.pt")
    pkl_name = next(n for n in entries if n.endswith("/data.pkl"))
    if target < 8:  # mostly the pickle: the zip's CRC would refuse most other mutations
        pkl = mutate(entries[pkl_name], mutations)
        _rezip(path, entries, pkl_name, pkl)
        identical = pkl == entries[pkl_name]
    else:  # the raw file: zip structure, storage bytes, CRCs
        raw = open(src, "rb").read()
        data = mutate(raw, mutations)
        with open(path, "wb") as f:
            f.write(data)
        identical = data == raw
        with contextlib.suppress(Exception):  # the storages as this file holds them
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                entries = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    event(check_pt(path, entries, want, identical))  # shown by --hypothesis-show-statistics


def test_fuzz_torch_file_baseline(valid_pt, tmp_path):
    """The unmutated file loads exactly (the fuzz's reference is right)."""
    src, entries, want = valid_pt
    assert check_pt(src, entries, want, identical=True) == "loaded"


# Mostly small values (so that many views are valid), sometimes huge or negative ones.
SMALL = st.integers(-1, 12)
SMALL_OR_HUGE = st.one_of(SMALL, SMALL, SMALL, st.sampled_from([2**31, 2**62, -(2**40)]))


@FUZZ
@given(
    storage_numel=st.integers(0, 24),
    declared=st.one_of(st.none(), st.just("right"), st.integers(0, 30)),
    offset=SMALL_OR_HUGE,
    size=st.lists(
        st.one_of(st.integers(0, 6), st.integers(0, 6), st.sampled_from([2**20, 2**33])),
        max_size=3,
    ),
    stride=st.lists(SMALL_OR_HUGE, min_size=4, max_size=4),
    stride_len_off=st.sampled_from([0] * 9 + [1]),  # 1 in 10: a stride of the wrong length
    byteorder=st.sampled_from(["little", "big"]),
)
def test_fuzz_tensor_views(
    tmp_path, storage_numel, declared, offset, size, stride, stride_len_off, byteorder
):
    """Views drawn at random over a storage of 0-24 floats (stored in either byte order):
    each either loads to exactly the tensor torch's own checked ``as_strided`` gives for the
    same view, or is refused with CheckpointError; torch refusing the view means we must
    refuse it too."""
    stride = stride[: len(size) + stride_len_off]
    storage = np.arange(storage_numel, dtype=np.float32) * 3 + 1
    numel = storage_numel if declared == "right" else declared
    path = craft(
        tmp_path / "v.pt",
        {"w": tensor_ops("0", offset, tuple(size), tuple(stride), numel=numel)},
        {"0": storage.astype(">f4" if byteorder == "big" else "<f4").tobytes()},
        byteorder=byteorder,
    )
    try:
        if numel not in (None, storage_numel) or len(size) != len(stride):
            raise ValueError("bad declared count or stride length")
        want = torch.from_numpy(storage).as_strided(tuple(size), tuple(stride), offset).numpy()
    except (RuntimeError, ValueError, OverflowError):
        want = None
    try:
        with time_limit(SECONDS_PER_CASE, path):
            got = torch_reader.read_torch_file(path)["w"]
    except CheckpointError as e:
        assert "tensor 'w'" in str(e), e
        # We may refuse more than torch (our size budget; empty shapes numpy cannot make),
        # never less.
        huge_empty = math.prod(n for n in size if n) > torch_reader.MAX_TENSOR_ELEMENTS
        assert want is None or want.size * 4 > 2**26 or huge_empty, (size, stride, offset, e)
        event("refused")
        return
    assert want is not None, (size, stride, offset, numel, got)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # exact: the same stored floats
    event("loaded")


# ------------------------------------------------------------------ captions pickle

CAPTIONS = {
    "vid0": [["a", "man", "is", "cooking"], ["someone", "cooks"]],
    "vid1": [["a", "dog", "runs"]],
    "vid2": [("two", "cats"), ["cats", "play"], ["x"]],
}


def _is_plain(obj) -> bool:
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            continue
        if not isinstance(o, (dict, list, tuple)):
            return False
        if id(o) in seen:
            continue
        seen.add(id(o))
        stack.extend(list(o.keys()) + list(o.values()) if isinstance(o, dict) else o)
    return True


@pytest.fixture(scope="module")
def captions_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("msvd"))
    with open(os.path.join(root, "test_list.txt"), "w") as f:
        f.write("\n".join(CAPTIONS) + "\n")
    os.makedirs(os.path.join(root, "videos"))
    for vid in CAPTIONS:
        open(os.path.join(root, "videos", vid + ".avi"), "wb").close()
    return root


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), protocol=st.sampled_from([0, 2, 4]))
def test_fuzz_captions_pickle(captions_root, mutations, protocol):
    valid = pickle.dumps(CAPTIONS, protocol=protocol)
    data = mutate(valid, mutations)
    path = os.path.join(captions_root, "raw-captions.pkl")
    with open(path, "wb") as f:
        f.write(data)
    try:
        with time_limit(SECONDS_PER_CASE, path):
            obj = msvd.load_captions_pickle(path)
            report = SkipReport()
            recs = msvd.read_split(captions_root, "test", report=report)
    except DataError as e:
        assert str(e).startswith(path), e
        assert data != valid, f"the unchanged file was refused: {e}"
        event("refused")
        return
    event("loaded")
    assert isinstance(obj, dict) and _is_plain(obj)
    assert all(isinstance(c, str) for r in recs for c in r.captions)
    if data == valid:
        assert obj == CAPTIONS and len(recs) == 3 and not len(report)
