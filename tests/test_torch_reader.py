"""The restricted .pt reader (models/torch_reader.py): files written by torch load to the same
values; crafted files (views past the storage, negative strides, huge sizes, wrong byte
counts, unknown dtypes, ...) are each refused with a CheckpointError naming the file, the
tensor and the problem, and none of them crashes the process.

Crafted files are built by hand (`craft`): a zip with ``<root>/data.pkl`` written opcode by
opcode the way torch writes it, and raw storage files; `test_crafted_matches_torch` checks
that a well-formed crafted file is one torch itself reads to the same tensor.
"""

import os
import pickle
import re
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from ucofia_jax.errors import CheckpointError
from ucofia_jax.models import clip_import, torch_reader

# ------------------------------------------------------------------ crafting


def _op(value) -> bytes:
    """Pickle opcodes of a plain value (int/str/tuple/bool), without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_ops(storage_key, offset, size, stride, storage="FloatStorage", numel=6) -> bytes:
    """``torch._utils._rebuild_tensor_v2(<storage pid>, offset, size, stride, False,
    OrderedDict())`` as torch pickles it (the values are not checked here)."""
    pid = b"(" + _op("storage") + _global("torch", storage) + _op(storage_key) + _op("cpu")
    pid += (_op(numel) if numel is not None else b"") + b"tQ"  # TUPLE, BINPERSID
    args = pid + _op(offset) + _op(size) + _op(stride) + b"\x89"  # NEWFALSE
    args += _global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE, REDUCE
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def craft(path, tensors: dict, storages: dict, root="archive", byteorder="little") -> str:
    """A zip-format torch file: ``tensors`` {name: opcodes of the tensor}, ``storages``
    {key: raw bytes, in ``byteorder``}."""
    body = b"\x80\x02}(" + b"".join(_op(k) + v for k, v in tensors.items()) + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", body)
        zf.writestr(f"{root}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{root}/data/{key}", raw)
        zf.writestr(f"{root}/version", "3\n")
    return str(path)


SIX = np.arange(6, dtype=np.float32) + 10.0  # storage "0": 6 floats


def one_tensor(path, **kw) -> str:
    storages = kw.pop("storages", {"0": SIX.tobytes()})
    args = dict(storage_key="0", offset=0, size=(2, 3), stride=(3, 1))
    args.update(kw)
    return craft(path, {"w": tensor_ops(**args)}, storages)


def refused(path, pattern):
    """The error names the file, the tensor 'w' and matches ``pattern``."""
    with pytest.raises(CheckpointError) as info:
        torch_reader.read_torch_file(path)
    msg = str(info.value)
    assert msg.startswith(path), msg
    assert "tensor 'w'" in msg, msg
    assert re.search(pattern, msg), msg
    return msg


# ------------------------------------------------------------------ valid files


def test_crafted_matches_torch(tmp_path):
    """The hand-made writer makes files torch reads: the crafting is faithful."""
    path = one_tensor(tmp_path / "ok.pt", offset=1, size=(2, 2), stride=(1, 2))
    ours = torch_reader.read_torch_file(path)["w"]
    theirs = torch.load(path, weights_only=True)["w"].numpy()
    np.testing.assert_array_equal(ours, theirs)  # exact: a copy of stored floats
    np.testing.assert_array_equal(ours, [[11.0, 13.0], [12.0, 14.0]])


def test_torch_save_round_trip(tmp_path):
    """Everything torch.save writes for weights: dtypes, views sharing one storage,
    transposed (non-contiguous) and expanded views, 0-d and empty tensors, tied weights,
    parameters, a v3 (untyped storage) dtype, nesting."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(3, 2)
    sd = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
        "f8": torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn),  # v3, untyped storage
        "row": base[1],  # offset into a shared storage
        "col": base[:, 2],  # stride 6
        "t": base.T,  # transposed
        "slab": base[1:3, 2:5],
        "expand": torch.arange(3.0).expand(4, 3),  # stride 0
        "scalar": torch.tensor(4.5),
        "empty": torch.zeros(0, 3),
        "tied_a": tied,
        "tied_b": tied,
        "param": torch.nn.Parameter(torch.randn(2)),
        "nested": {"inner": {"x": torch.ones(2)}},
    }
    path = str(tmp_path / "sd.pt")
    torch.save(sd, path)
    got = torch_reader.read_torch_file(path)
    flat = {k: v for k, v in sd.items() if k != "nested"}
    flat["nested.inner.x"] = sd["nested"]["inner"]["x"]
    assert set(got) == set(flat)
    for k, v in flat.items():
        ref = v.detach()
        exotic = {"bf16": ml_dtypes.bfloat16, "f8": ml_dtypes.float8_e4m3fn}
        want = ref.float().numpy() if k in exotic else ref.numpy()
        assert got[k].shape == tuple(ref.shape), k
        assert got[k].dtype == exotic.get(k, want.dtype), k
        np.testing.assert_array_equal(np.asarray(got[k], want.dtype), want, err_msg=k)


def test_state_dict_wrapper_and_reexport(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, path)
    assert list(torch_reader.read_torch_file(path)) == ["a"]
    # clip_import keeps the reader's name; one error class for every weights file.
    assert clip_import.read_torch_file is torch_reader.read_torch_file
    assert torch_reader.CheckpointError is clip_import.CheckpointError is CheckpointError


# ------------------------------------------------------------------ crafted faults


def test_view_past_the_storage(tmp_path):
    # offset 2 + (2-1)*3 + (3-1)*1 = 7 > the 6 elements of the storage
    refused(one_tensor(tmp_path / "past.pt", offset=2), r"reaches element 7 .* 6 elements")


def test_view_past_the_storage_by_stride(tmp_path):
    refused(one_tensor(tmp_path / "stride.pt", stride=(1000, 1)), r"reaches element 1002")


def test_negative_stride(tmp_path):
    refused(one_tensor(tmp_path / "neg.pt", offset=5, stride=(-3, -1)), r"stride .*>= 0")


def test_negative_offset(tmp_path):
    refused(one_tensor(tmp_path / "negoff.pt", offset=-4), r"storage offset -4")


def test_huge_sizes(tmp_path):
    refused(one_tensor(tmp_path / "huge.pt", size=(2**40, 2**40)), r"elements \(huge\)")
    # Empty, but numpy cannot make the shape (torch can): refused, not a ValueError.
    refused(one_tensor(tmp_path / "empty.pt", size=(0, 2**33, 2**33), stride=(0, 0, 0)), r"empty")
    # Within the element cap but stride 0: in bounds, yet it would take terabytes.
    refused(
        one_tensor(tmp_path / "bomb.pt", size=(2**20, 2**20), stride=(0, 0)),
        r"over the budget",
    )


def test_bad_size_values(tmp_path):
    refused(one_tensor(tmp_path / "negsize.pt", size=(-1, 3)), r"size .* ints >= 0")
    refused(one_tensor(tmp_path / "boolsize.pt", size=(True, 3)), r"size .* ints >= 0")
    refused(one_tensor(tmp_path / "dims.pt", size=(2, 3), stride=(3,)), r"size has 2 dims")
    refused(
        one_tensor(tmp_path / "manydims.pt", size=(1,) * 65, stride=(1,) * 65),
        r"65 dimensions",
    )


def test_wrong_byte_count(tmp_path):
    # The pid declares 6 floats (24 bytes); the zip entry has 20.
    p = one_tensor(tmp_path / "short.pt", storages={"0": SIX.tobytes()[:20]})
    refused(p, r"storage 0 has 20 bytes in the zip but declares 6 elements")
    p = one_tensor(tmp_path / "long.pt", storages={"0": SIX.tobytes() + b"\0" * 8})
    refused(p, r"has 32 bytes .* declares 6")
    # No declared count: the byte count must still be whole elements.
    p = one_tensor(tmp_path / "odd.pt", numel=None, storages={"0": SIX.tobytes()[:22]})
    refused(p, r"22 bytes, not a multiple")


def test_unknown_dtype(tmp_path):
    refused(one_tensor(tmp_path / "cplx.pt", storage="ComplexFloatStorage"), r"unsupported dtype")


def test_missing_storage(tmp_path):
    refused(one_tensor(tmp_path / "nostore.pt", storage_key="7"), r"data/7 is missing")


def test_one_storage_two_dtypes(tmp_path):
    ops = {
        "v": tensor_ops("0", 0, (6,), (1,)),
        "w": tensor_ops("0", 0, (12,), (1,), storage="HalfStorage", numel=12),
    }
    refused(craft(tmp_path / "twice.pt", ops, {"0": SIX.tobytes()}), r"declared as .*elsewhere")


def test_code_and_garbage_refused(tmp_path):
    evil = _global("os", "system") + b"(" + _op("echo pwned") + b"tR"
    p = craft(tmp_path / "evil.pt", {"w": evil}, {})
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to unpickle global os\.system"):
        torch_reader.read_torch_file(p)
    p = craft(tmp_path / "trunc.pt", {"w": tensor_ops("0", 0, (6,), (1,))[:-5]}, {})
    with pytest.raises(CheckpointError, match=r"trunc\.pt: unreadable data\.pkl"):
        torch_reader.read_torch_file(p)
    cyc = b"}q\xc8(" + _op("self") + b"h\xc8u"  # a dict that contains itself (memo 200)
    p = craft(
        tmp_path / "cycle.pt", {"d": cyc, "w": tensor_ops("0", 0, (6,), (1,))}, {"0": SIX.tobytes()}
    )
    assert list(torch_reader.read_torch_file(p)) == ["w"]


def test_nesting_and_pickle_size_bounds(tmp_path, monkeypatch):
    deep = {}
    for _ in range(torch_reader.MAX_DEPTH + 5):
        deep = {"x": deep}
    p = craft(tmp_path / "deep.pt", {"d": _op(deep), "w": tensor_ops("0", 0, (6,), (1,))}, {})
    with pytest.raises(CheckpointError, match=r"deep\.pt: 'd(\.x)+' is nested deeper than 100"):
        torch_reader.read_torch_file(p)
    p = one_tensor(tmp_path / "ok.pt")
    monkeypatch.setattr(torch_reader, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"ok\.pt: data\.pkl is \d+ bytes \(limit 100\)"):
        torch_reader.read_torch_file(p)


def test_crafted_faults_do_not_crash_a_fresh_process(tmp_path):
    """All crafted faults in one child process: it must exit normally (a SIGSEGV, which an
    unchecked as_strided gave on the first file, would show as a negative return code)."""
    files = [
        one_tensor(tmp_path / "a.pt", offset=10**6, size=(64, 64), stride=(64, 1)),
        one_tensor(tmp_path / "b.pt", offset=5, stride=(-3, -1)),
        one_tensor(tmp_path / "c.pt", size=(2**40, 2**40)),
        one_tensor(tmp_path / "d.pt", storages={"0": b"\0" * 4}),
        one_tensor(tmp_path / "e.pt", stride=(2**62, 2**62)),
    ]
    code = (
        "import sys\n"
        "from ucofia_jax.models import torch_reader\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        torch_reader.read_torch_file(p)\n"
        "        print('LOADED', p)\n"
        "    except torch_reader.CheckpointError as e:\n"
        "        print('REFUSED', e)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert len(lines) == len(files) and all(x.startswith("REFUSED") for x in lines), lines
