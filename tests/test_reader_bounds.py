"""The .pt reader's memory bound and byte order (models/torch_reader.py).

Memory: the three crafted files of issue 21 (an expanded 8190 x 8190 uint8 view in a ~1.5 kB
file; a 32 MiB file whose tensors view its storage many times; an extra zip entry whose
directory record claims 25 MiB) either load within the bound or are refused with one line
naming the file. The peak of what the reader allocates is measured with tracemalloc (numpy
reports its buffers to it): it must stay within ``file bytes + MAX_EXPANSION x storage bytes
read + cap`` plus a little for Python objects.

Byte order: big-endian files are crafted here (the ``byteorder`` record says ``big``, the
storages hold big-endian bytes) for the typed-storage path (``_rebuild_tensor_v2``) and the
untyped one (``_rebuild_tensor_v3``, every dtype it knows), and must read back the values
written.
"""

import io
import os
import pickle
import struct
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from test_torch_reader import _global, _op, craft, tensor_ops

from ucofia_jax.errors import CheckpointError, ConfigError
from ucofia_jax.models import torch_reader

MIB = 1 << 20
CAP = torch_reader.DEFAULT_CAP_MIB * MIB
OBJECTS = 1 * MIB  # the unpickled tree, zipfile's records, the result dict: well under this


def peak_of(fn):
    """(result or the CheckpointError raised, peak bytes traced while ``fn`` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            result = fn()
        except CheckpointError as e:
            result = e
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def bound(path) -> int:
    """What the module doc promises for a file: its bytes (data.pkl and storages, read once)
    + MAX_EXPANSION x its bytes + the cap (the tensors) + Python objects."""
    size = os.path.getsize(path)
    return size + torch_reader.MAX_EXPANSION * size + CAP + OBJECTS


def patch_central_size(path, entry: str, claimed: int) -> None:
    """Make the zip's central directory claim ``claimed`` bytes for ``entry`` (compressed and
    uncompressed size), leaving its data as it is: a directory that lies."""
    data = bytearray(open(path, "rb").read())
    name = entry.encode()
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == name:
            struct.pack_into("<II", data, at + 20, claimed, claimed)
            open(path, "wb").write(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{entry} not in {path}")


# ------------------------------------------------------------------ memory


def test_expanded_view_of_a_tiny_file_loads_within_the_bound(tmp_path):
    # 8190 x 8190 uint8 = 63.97 MiB from one stored byte: under the 64 MiB cap, so it loads,
    # as one 64 MiB copy (an index array would have taken 8 bytes per element: 512 MiB more).
    ops = tensor_ops("0", 0, (8190, 8190), (0, 0), storage="ByteStorage", numel=1)
    path = craft(tmp_path / "expand.pt", {"w": ops}, {"0": b"\x07"})
    assert os.path.getsize(path) < 2000
    got, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert not isinstance(got, Exception), got
    assert got["w"].shape == (8190, 8190) and got["w"].dtype == np.uint8
    assert got["w"][0, 0] == got["w"][-1, -1] == 7 and got["w"].flags.c_contiguous
    assert 8190 * 8190 <= peak <= bound(path), (peak, bound(path))
    # One element more than the cap allows is refused before anything is allocated.
    ops = tensor_ops("0", 0, (8193, 8193), (0, 0), storage="ByteStorage", numel=1)
    path = craft(tmp_path / "expand_more.pt", {"w": ops}, {"0": b"\x07"})
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and str(err).startswith(path), err
    assert "over the budget" in str(err) and "\n" not in str(err)
    assert peak <= OBJECTS, peak


@pytest.mark.slow
def test_many_views_of_a_32_mib_file_stay_within_the_bound(tmp_path):
    n = 32 * MIB
    rows = n // 4096
    views = {  # 128 MiB expanded, 32 MiB transposed (non-contiguous), a strided column
        "expanded": tensor_ops("0", 0, (4, n), (0, 1), storage="ByteStorage", numel=n),
        "transposed": tensor_ops("0", 0, (4096, rows), (1, 4096), storage="ByteStorage", numel=n),
        "column": tensor_ops("0", 5, (rows,), (4096,), storage="ByteStorage", numel=n),
    }
    storage = (np.arange(n, dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8)
    path = craft(tmp_path / "big.pt", views, {"0": storage.tobytes()})
    got, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert not isinstance(got, Exception), got
    assert peak <= bound(path), (peak, bound(path))
    np.testing.assert_array_equal(got["expanded"][3], storage)
    np.testing.assert_array_equal(got["transposed"], storage.reshape(rows, 4096).T)
    np.testing.assert_array_equal(got["column"], storage[5::4096])
    del got
    # A fourth view past MAX_EXPANSION x 32 MiB + the cap: refused, nothing allocated for
    # tensors (the peak is the storage and data.pkl, i.e. the file).
    views["more"] = tensor_ops("0", 0, (2, n), (0, 1), storage="ByteStorage", numel=n)
    path = craft(tmp_path / "bigger.pt", views, {"0": storage.tobytes()})
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and "tensor 'more'" in str(err), err
    assert str(err).startswith(path) and "over the budget" in str(err)
    assert peak <= os.path.getsize(path) + OBJECTS, peak


def test_a_size_claimed_in_the_zip_directory_buys_nothing(tmp_path):
    # 80 MiB expanded from one float: over 4 x 4 bytes + 64 MiB. An extra entry whose
    # directory record claims 25 MiB must not raise the budget (it was never read).
    ops = {"w": tensor_ops("0", 0, (5 * MIB, 4), (0, 0), numel=1)}
    path = craft(tmp_path / "claim.pt", ops, {"0": np.float32(1.5).tobytes(), "pad": b"x"})
    patch_central_size(path, "archive/data/pad", 25 * MIB)
    assert os.path.getsize(path) < 2000
    with zipfile.ZipFile(path) as zf:  # the claim is what zipfile believes
        assert zf.getinfo("archive/data/pad").file_size == 25 * MIB
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and str(err).startswith(path), err
    assert "tensor 'w'" in str(err) and "over the budget" in str(err)
    assert peak <= OBJECTS, peak
    # The storage's own entry claiming 25 MiB: refused before zipfile allocates 25 MiB.
    path = craft(tmp_path / "lie.pt", {"w": tensor_ops("0", 0, (6,), (1,), numel=None)}, {})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/data/0", np.arange(6, dtype=np.float32).tobytes())
    patch_central_size(path, "archive/data/0", 24 * MIB)
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and str(err).startswith(path), err
    assert "past the end" in str(err), err
    assert peak <= OBJECTS, peak


def test_nested_entries_cannot_read_the_same_bytes_twice(tmp_path):
    # Storage "0"'s data is a whole zip entry, storage "1" (local header and data), which a
    # second directory record points into: each fits in the file, both together do not.
    data = np.arange(4096, dtype=np.float32)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data/1", data.tobytes())
    inner = inner.getvalue()
    cd_at = inner.find(b"PK\x01\x02")
    entry_1, record_1 = inner[:cd_at], bytearray(inner[cd_at : inner.find(b"PK\x05\x06")])
    ops = {
        "a": tensor_ops("0", 0, (len(entry_1),), (1,), storage="ByteStorage", numel=len(entry_1)),
        "b": tensor_ops("1", 0, (4096,), (1,), numel=4096),
    }
    path = craft(tmp_path / "nested.pt", ops, {"0": entry_1})
    raw = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        outer = zf.getinfo("archive/data/0")
    start_0 = outer.header_offset + 30 + len(outer.filename) + len(outer.extra)
    assert raw[start_0 : start_0 + len(entry_1)] == entry_1
    struct.pack_into("<I", record_1, 42, start_0)  # record 1 -> inside storage 0's data
    end = raw.find(b"PK\x05\x06")
    count, cd_size = (
        struct.unpack_from("<H", raw, end + 10)[0],
        struct.unpack_from("<I", raw, end + 12)[0],
    )
    raw[end:end] = record_1
    struct.pack_into(
        "<HHI", raw, end + len(record_1) + 8, count + 1, count + 1, cd_size + len(record_1)
    )
    open(path, "wb").write(bytes(raw))
    with zipfile.ZipFile(path) as zf:  # a zip zipfile accepts, entry 1 readable on its own
        assert zf.read("archive/data/1") == data.tobytes()
    with pytest.raises(CheckpointError, match=r"more than the \d+-byte file holds"):
        torch_reader.read_torch_file(path)


OPCODE_PATTERNS = {  # (opcodes of one repetition, how many opcodes that is)
    "empty dicts": (b"}", 1),
    "empty lists": (b"]", 1),
    "1-tuples": (b"N\x85", 2),
    "module objects": (_global("__torch__.m", "M") + b")\x81", 3),
    "storage types": (_global("torch", "FloatStorage"), 1),
    "dtypes": (_global("torch", "uint16"), 1),
    "short strings": (b"X\x02\x00\x00\x00ab", 1),
    "memoised dicts": (b"}q\x01", 2),
    "ordered dicts": (_global("collections", "OrderedDict") + b")R", 3),
    "tensor records": (tensor_ops("0", 0, (6,), (1,)), 26),
}


@pytest.mark.parametrize("pattern", sorted(OPCODE_PATTERNS))
def test_the_object_tree_stays_within_its_estimate(tmp_path, pattern):
    # data.pkl = a list of repetitions: within the cap, so it is built (then refused:
    # no tensors). What unpickling held must be within the estimate the reader checked
    # against the cap: _BYTES_PER_OPCODE per opcode (+ 4 bytes per string byte).
    ops, per = OPCODE_PATTERNS[pattern]
    n = 100_000 // per  # 100k opcodes: 12.8 MB estimated
    path = str(tmp_path / "tree.pt")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02(" + ops * n + b"l.")
    strings = 8 * n if pattern == "short strings" else 0
    estimate = torch_reader._BYTES_PER_OPCODE * (per * n + 4) + strings
    assert estimate < CAP
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and "no tensors found" in str(err), err
    assert peak <= os.path.getsize(path) + estimate + OBJECTS, (peak, estimate)


def test_an_object_tree_over_the_cap_is_refused_before_it_is_built(tmp_path):
    # 1 M empty dicts: 81 MB if built. Estimated at 128 MB, over the 64 MiB cap: refused
    # while the opcodes are counted; what was held is the pickle's bytes.
    path = str(tmp_path / "dicts.pt")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02(" + b"}" * (1 << 20) + b"l.")
    err, peak = peak_of(lambda: torch_reader.read_torch_file(path))
    assert isinstance(err, CheckpointError) and str(err).startswith(path), err
    assert "objects would take more than" in str(err) and torch_reader.CAP_ENV in str(err)
    assert peak <= 2 * os.path.getsize(path) + OBJECTS, peak
    # Sets (233 bytes per opcode byte) are refused by name: no weights file has one.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04(" + b"\x8f" * 1000 + b"l.")
    with pytest.raises(CheckpointError, match=r"builds a set \(EMPTY_SET at byte 3\)"):
        torch_reader.read_torch_file(path)


def test_the_cap_is_raised_by_the_environment_or_an_argument(tmp_path, monkeypatch):
    ops = {"w": tensor_ops("0", 0, (17 * MIB, 4), (0, 0), storage="ByteStorage", numel=1)}
    path = craft(tmp_path / "mask.pt", ops, {"0": b"\x01"})  # 68 MiB: over the 64 MiB default
    with pytest.raises(CheckpointError, match=torch_reader.CAP_ENV):
        torch_reader.read_torch_file(path)
    assert torch_reader.read_torch_file(path, cap_bytes=80 * MIB)["w"].shape == (17 * MIB, 4)
    monkeypatch.setenv(torch_reader.CAP_ENV, "80")
    assert torch_reader.read_torch_file(path)["w"].shape == (17 * MIB, 4)
    monkeypatch.setenv(torch_reader.CAP_ENV, "lots")
    with pytest.raises(ConfigError, match=rf"{torch_reader.CAP_ENV}='lots': expected"):
        torch_reader.read_torch_file(path)


# ------------------------------------------------------------------ byte order


def tensor_v3_ops(key, offset, size, stride, dtype: str, nbytes: int) -> bytes:
    """``torch._utils._rebuild_tensor_v3(<untyped storage pid>, offset, size, stride, False,
    OrderedDict(), torch.<dtype>)`` as torch pickles it for dtypes without a typed storage."""
    pid = b"(" + _op("storage") + _global("torch.storage", "UntypedStorage") + _op(key)
    pid += _op("cpu") + _op(nbytes) + b"tQ"
    args = pid + _op(offset) + _op(size) + _op(stride) + b"\x89"
    args += _global("collections", "OrderedDict") + b")R" + _global("torch", dtype)
    return _global("torch._utils", "_rebuild_tensor_v3") + b"(" + args + b"tR"


VALUES = {  # values whose bytes are not palindromes, so a missing swap shows
    "uint16": [1, 2, 258, 65534],
    "uint32": [1, 2**31 + 5, 70000, 3],
    "uint64": [1, 2**63 + 9, 2**40, 3],
    "int16": [-2, 300, 7, -32768],
    "int32": [-2, 1 << 20, 123456, -7],
    "int64": [-2, 1 << 40, 5, -(1 << 50)],
    "float16": [1.5, -2.25, 65504.0, 1e-3],
    "bfloat16": [1.5, -2.25, 3.0e38, 1e-3],
    "float32": [1.5, -2.25, 3.4e38, 1e-30],
    "float64": [1.5, -2.25, 1e300, 1e-300],
    "float8_e4m3fn": [0.5, -1.0, 448.0, 2.0],
    "float8_e5m2": [0.5, -1.0, 57344.0, 2.0],
    "int8": [-1, 2, 127, -128],
    "uint8": [1, 2, 255, 128],
    "bool": [True, False, True, True],
}
TYPED = {  # dtype -> typed storage (_rebuild_tensor_v2)
    "uint8": "ByteStorage",
    "int8": "CharStorage",
    "int16": "ShortStorage",
    "int32": "IntStorage",
    "int64": "LongStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "bool": "BoolStorage",
}


def _want(dtype: str) -> np.ndarray:
    return np.asarray(VALUES[dtype], torch_reader.TENSOR_DTYPES[dtype])


@pytest.mark.parametrize("dtype", sorted(TYPED))
def test_big_endian_typed_storages(tmp_path, dtype):
    want = _want(dtype)
    n = want.itemsize
    stored = want.view(f"u{n}").astype(np.dtype(f"u{n}").newbyteorder(">")).tobytes()
    ops = {
        "w": tensor_ops("0", 0, (4,), (1,), storage=TYPED[dtype], numel=4),
        "t": tensor_ops("0", 0, (2, 2), (1, 2), storage=TYPED[dtype], numel=4),  # transposed
    }
    path = craft(tmp_path / "be.pt", ops, {"0": stored}, byteorder="big")
    got = torch_reader.read_torch_file(path)
    assert got["w"].dtype == want.dtype and got["w"].dtype.isnative
    np.testing.assert_array_equal(
        got["w"].view(f"u{want.itemsize}"), want.view(f"u{want.itemsize}")
    )
    np.testing.assert_array_equal(
        got["t"].view(f"u{want.itemsize}"), want.reshape(2, 2).T.view(f"u{want.itemsize}")
    )
    # torch reads the crafted file to the same values: the crafting is faithful.
    theirs = torch.load(path, weights_only=True)["w"]
    if dtype == "bfloat16":
        theirs = theirs.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(theirs), want)


@pytest.mark.parametrize("dtype", sorted(VALUES))
def test_big_endian_untyped_storages(tmp_path, dtype):
    want = _want(dtype)
    n = want.itemsize
    stored = want.view(f"u{n}").astype(np.dtype(f"u{n}").newbyteorder(">")).tobytes()
    ops = {
        "w": tensor_v3_ops("0", 0, (4,), (1,), dtype, nbytes=4 * n),
        "t": tensor_v3_ops("0", 0, (2, 2), (1, 2), dtype, nbytes=4 * n),
    }
    path = craft(tmp_path / "be3.pt", ops, {"0": stored}, byteorder="big")
    got = torch_reader.read_torch_file(path)
    assert got["w"].dtype == want.dtype and got["w"].dtype.isnative
    # compared as bits: exact, and NaN-free comparison for float8/bfloat16 alike
    np.testing.assert_array_equal(got["w"].view(f"u{n}"), want.view(f"u{n}"))
    np.testing.assert_array_equal(got["t"].view(f"u{n}"), want.reshape(2, 2).T.view(f"u{n}"))


def test_little_endian_untyped_storage_matches_torch(tmp_path):
    # The v3 crafting is faithful: torch reads a little-endian one to the same values.
    want = _want("uint16")
    path = craft(
        tmp_path / "le3.pt",
        {"w": tensor_v3_ops("0", 0, (4,), (1,), "uint16", nbytes=8)},
        {"0": want.tobytes()},
    )
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["w"].numpy(), want)
    np.testing.assert_array_equal(torch_reader.read_torch_file(path)["w"], want)


def test_legacy_files_give_the_zip_path_dtypes(tmp_path):
    # Legacy (non-zip) storages are little-endian on disk whatever the writer; torch reads
    # them to native arrays, and bfloat16 comes back as ml_dtypes' bfloat16, as from a zip.
    sd = {  # (torch 2.13 writes a legacy uint16 file but cannot read it back)
        "i32": torch.tensor(VALUES["int32"], dtype=torch.int32),
        "f16": torch.tensor(VALUES["float16"], dtype=torch.float16),
        "bf16": torch.tensor(VALUES["bfloat16"], dtype=torch.bfloat16),
        "f32": torch.tensor(VALUES["float32"], dtype=torch.float32),
    }
    legacy, zipped = str(tmp_path / "legacy.pt"), str(tmp_path / "zip.pt")
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    torch.save(sd, zipped)
    assert not zipfile.is_zipfile(legacy)
    a, b = torch_reader.read_torch_file(legacy), torch_reader.read_torch_file(zipped)
    for k in sd:
        assert a[k].dtype == b[k].dtype and a[k].dtype.isnative, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    shapes = torch_reader.read_torch_shapes(legacy)
    assert shapes["bf16"] == ((4,), np.dtype(ml_dtypes.bfloat16))


# ------------------------------------------------------------------ plain pickles


def test_plain_pickle_with_code_names_the_global(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)
    for read in (torch_reader.read_torch_file, torch_reader.read_torch_shapes):
        with pytest.raises(CheckpointError) as info:
            read(path)
        msg = str(info.value)
        assert msg.startswith(path) and "\n" not in msg, msg
        assert f"refusing to unpickle global {os.system.__module__}.system" in msg, msg
        assert "weights_only" not in msg, msg


def test_torch_refusal_is_rephrased_without_its_advice(tmp_path):
    # A legacy file our pre-scan lets through (a TorchScript-style module object) but torch's
    # restricted loader refuses: its message's reason is kept, its weights_only=False advice
    # is not.
    path = str(tmp_path / "legacy_module.pt")
    with open(path, "wb") as f:
        for obj in (torch_reader.LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(b"\x80\x02" + _global("__torch__.evil", "Thing") + b")\x81}b.")
        pickle.dump([], f, protocol=2)
    with pytest.raises(CheckpointError) as info:
        torch_reader.read_torch_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: refused by torch's restricted loader"), msg
    assert "GLOBAL __torch__.evil.Thing was not an allowed global" in msg, msg
    assert "\n" not in msg and "\x1b" not in msg, msg
    for advice in ("weights_only", "will likely succeed", "add_safe_globals"):
        assert advice not in msg, msg


def test_legacy_storages_must_fit_in_the_file(tmp_path):
    # torch allocates a legacy storage at the size its pickle declares before reading it: a
    # few-byte file declaring 4 TiB is refused before torch sees it.
    path = str(tmp_path / "legacy_claim.pt")
    with open(path, "wb") as f:
        for obj in (torch_reader.LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        ops = tensor_ops("0", 0, (6,), (1,), numel=2**40)
        ops = ops.replace(_op(2**40) + b"tQ", _op(2**40) + b"NtQ")  # + view_metadata None
        f.write(b"\x80\x02}(" + _op("w") + ops + b"u.")
        pickle.dump(["0"], f, protocol=2)
    for read in (torch_reader.read_torch_file, torch_reader.read_torch_shapes):
        with pytest.raises(CheckpointError, match=r"storages declare 4398046511104 bytes, more"):
            read(path)
