"""Tensors of PyTorch zip files (``torch.save`` since 1.6, TorchScript archives) without torch
and without running code from the file.

A zip-format ``.pt``/``.bin`` holds ``<root>/data.pkl`` (the object tree, a pickle) and one
raw little-endian byte file per storage (``<root>/data/<key>``). The pickle names a few
torch callables to rebuild tensors; here a restricted unpickler maps exactly those names to
inert records (`_TensorRef`, `_StorageRef`) and refuses every other global. Nothing is read
from the storages while unpickling: once the tree is loaded, each tensor is validated and
materialised under its dotted name, so an error names the file, the tensor and the problem.

Memory safety: a pickled tensor is a view ``(storage, offset, size, stride)`` chosen by
whoever wrote the file. Before any byte is touched every view is checked: integer offset,
sizes and strides (no bools, no negatives), at most `MAX_DIMS` dimensions, the element count
within `MAX_TENSOR_ELEMENTS`, the largest index ``offset + sum((size_i - 1) * stride_i)``
inside the storage, a known dtype, and the storage's byte count equal to its declared element
count times the item size (and a multiple of the item size). The copy then uses plain slicing
(contiguous views) or bounds-checked integer indexing (others); no raw-pointer view
(``as_strided``) is built. The object walk is iterative, visits each container once (shared
and cyclic references cannot blow it up), and is bounded in depth and entries; the total
materialised bytes are bounded relative to the storage bytes, so a small file cannot ask for
gigabytes by viewing one storage many times.

Legacy (pre-1.6, non-zip) files fall back to ``torch.load(weights_only=True)`` when torch is
installed (torch's own restricted loader).
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np

from ucofia_jax.errors import CheckpointError

# torch.<Name>Storage -> numpy dtype (typed storages, ``_rebuild_tensor_v2``).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "DoubleStorage": np.dtype(np.float64),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# torch.<dtype> -> numpy dtype (``_rebuild_tensor_v3`` over an UntypedStorage of bytes; torch
# uses it for the dtypes that have no typed storage class).
TENSOR_DTYPES = {
    name: np.dtype(dt)
    for name, dt in (
        ("uint16", np.uint16),
        ("uint32", np.uint32),
        ("uint64", np.uint64),
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", ml_dtypes.float8_e5m2),
        ("float32", np.float32),
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("float64", np.float64),
        ("int64", np.int64),
        ("int32", np.int32),
        ("int16", np.int16),
        ("int8", np.int8),
        ("uint8", np.uint8),
        ("bool", np.bool_),
    )
}

MAX_DIMS = 64  # torch's own limit on tensor dimensions
MAX_TENSOR_ELEMENTS = 2**40
MAX_PICKLE_BYTES = 1 << 30  # data.pkl of ViT-L/14's TorchScript archive is a few MB
MAX_DEPTH = 100  # nesting of dicts in the object tree (TorchScript: module depth ~ 10)
MAX_ENTRIES = 10_000_000  # dict items visited in the object tree
# Materialised bytes may exceed the storage bytes (tied weights, expanded views) but only
# by this factor plus `_SLACK_BYTES`: a small file cannot ask for gigabytes.
MAX_EXPANSION = 4
_SLACK_BYTES = 1 << 26

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


class _StorageType:
    """The global ``torch.<Name>Storage`` (or ``torch.storage.UntypedStorage``)."""

    def __init__(self, name: str):
        self.name = name


class _DtypeName:
    """The global ``torch.<dtype>`` (third argument of ``_rebuild_tensor_v3``)."""

    def __init__(self, name: str):
        self.name = name


class _StorageRef:
    """A persistent id ``('storage', type, key, location, numel)``: not read yet."""

    def __init__(self, storage_type, key, numel):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _TensorRef:
    """What ``_rebuild_tensor_v2/v3`` was asked to build; checked when it gets a name."""

    def __init__(self, storage, offset, size, stride, dtype_name=None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype_name = dtype_name  # v3 only: the tensor's dtype over untyped bytes


class _TorchModuleState(dict):
    """Stand-in for a ``__torch__.*`` (TorchScript) object: just its attribute dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _rebuild_v2(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    return _TensorRef(storage, offset, size, stride, dtype_name=dtype)


def _rebuild_parameter(data, *unused):
    return data


def _identity(data, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows the handful of globals a weights pickle needs; each maps to an inert stand-in."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        if module == "torch._utils":
            known = {
                "_rebuild_tensor_v2": _rebuild_v2,
                "_rebuild_tensor_v3": _rebuild_v3,
                "_rebuild_parameter": _rebuild_parameter,
                "_rebuild_parameter_with_state": _rebuild_parameter,
            }
            if name in known:
                return known[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)  # an unknown one is refused with the tensor's name
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name.isidentifier() and name.islower():
            return _DtypeName(name)  # inert; only meaningful as _rebuild_tensor_v3's dtype
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _identity  # typed lists of older TorchScript archives
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _identity
        if module.startswith("__torch__"):
            return _TorchModuleState
        raise CheckpointError(
            f"{self._source}: refusing to unpickle global {module}.{name} "
            "(only tensors and module attributes are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {_short.repr(pid)}")
        numel = pid[4] if len(pid) >= 5 else None
        return _StorageRef(pid[1], pid[2], numel)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Storages:
    """Reads each storage file of the zip once, after checking its byte count."""

    def __init__(self, zf: zipfile.ZipFile, root: str, source: str, byteorder: str):
        self._zf, self._root, self._source = zf, root, source
        self._byteorder = byteorder
        self._cache: dict[str, tuple] = {}  # key -> (dtype name, numel, array)
        self.bytes_read = 0

    def get(self, ref: _StorageRef, dtype: np.dtype, dtype_name: str, where: str) -> np.ndarray:
        key = ref.key
        if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
            raise CheckpointError(f"{where}: bad storage key {_short.repr(key)}")
        if key in self._cache:
            seen_dtype, seen_numel, arr = self._cache[key]
            if (seen_dtype, seen_numel) != (dtype_name, ref.numel):
                raise CheckpointError(
                    f"{where}: storage {key} is declared as {dtype_name} x {ref.numel} here "
                    f"and as {seen_dtype} x {seen_numel} elsewhere"
                )
            return arr
        name = f"{self._root}/data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{where}: storage file {name} is missing from the zip") from None
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses storages; a compressed entry could inflate without bound.
            raise CheckpointError(f"{where}: storage file {name} is compressed (torch stores raw)")
        nbytes = info.file_size
        if ref.numel is not None:
            if not _is_int(ref.numel) or ref.numel < 0:
                raise CheckpointError(
                    f"{where}: storage {key} declares {_short.repr(ref.numel)} elements"
                )
            want = ref.numel * dtype.itemsize
            if nbytes != want:
                raise CheckpointError(
                    f"{where}: storage {key} has {nbytes} bytes in the zip but declares "
                    f"{ref.numel} elements of {dtype_name} ({want} bytes)"
                )
        if nbytes % dtype.itemsize:
            raise CheckpointError(
                f"{where}: storage {key} has {nbytes} bytes, not a multiple of the "
                f"{dtype.itemsize}-byte {dtype_name}"
            )
        raw = self._zf.read(name)
        if len(raw) != nbytes:
            raise CheckpointError(f"{where}: storage file {name} is truncated")
        self.bytes_read += nbytes
        if self._byteorder == ">":
            arr = np.frombuffer(raw, dtype=dtype.newbyteorder(">")).astype(dtype)
        else:
            arr = np.frombuffer(raw, dtype=dtype)
        self._cache[key] = (dtype_name, ref.numel, arr)
        return arr


def _tensor_dtype(ref: _TensorRef, where: str) -> tuple[np.dtype, str, np.dtype]:
    """(dtype of the storage's elements, its name, dtype of the tensor)."""
    st = ref.storage.storage_type if isinstance(ref.storage, _StorageRef) else None
    if not isinstance(st, _StorageType):
        raise CheckpointError(f"{where}: storage type {_short.repr(st)} is not a torch storage")
    if ref.dtype_name is None:
        if st.name not in STORAGE_DTYPES:
            raise CheckpointError(
                f"{where}: unsupported dtype {st.name} (known: {', '.join(STORAGE_DTYPES)})"
            )
        dt = STORAGE_DTYPES[st.name]
        return dt, st.name, dt
    dname = ref.dtype_name.name if isinstance(ref.dtype_name, _DtypeName) else None
    if st.name != "UntypedStorage" or dname not in TENSOR_DTYPES:
        raise CheckpointError(
            f"{where}: unsupported dtype {_short.repr(dname)} over {st.name} "
            f"(known: {', '.join(sorted(TENSOR_DTYPES))})"
        )
    # An untyped storage counts bytes; the tensor's view indexes elements of its dtype.
    return np.dtype(np.uint8), "UntypedStorage", TENSOR_DTYPES[dname]


def _check_view(ref: _TensorRef, n_storage: int, where: str) -> tuple[tuple, tuple, int, int]:
    """(size, stride, offset, numel) after every bound that keeps the copy inside the storage."""
    offset, size, stride = ref.offset, ref.size, ref.stride
    if not _is_int(offset) or offset < 0:
        raise CheckpointError(f"{where}: storage offset {_short.repr(offset)} is not an int >= 0")
    if not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise CheckpointError(f"{where}: size and stride must be tuples")
    if len(size) > MAX_DIMS:
        raise CheckpointError(f"{where}: {len(size)} dimensions (at most {MAX_DIMS})")
    if len(size) != len(stride):
        raise CheckpointError(f"{where}: size has {len(size)} dims but stride {len(stride)}")
    if not all(_is_int(s) and s >= 0 for s in size):
        raise CheckpointError(f"{where}: size {_short.repr(size)} must be ints >= 0")
    if not all(_is_int(s) and s >= 0 for s in stride):
        raise CheckpointError(
            f"{where}: stride {_short.repr(stride)} must be ints >= 0 (negative strides "
            "would read before the storage)"
        )
    numel = math.prod(size)
    if numel > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where}: size {size} has {numel} elements (huge)")
    if numel == 0:
        return size, stride, offset, 0  # reads nothing: any offset is harmless (torch agrees)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= n_storage:
        raise CheckpointError(
            f"{where}: view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last} but the storage has {n_storage} elements"
        )
    return size, stride, offset, numel


def _contiguous_strides(size: tuple) -> tuple:
    out, acc = [], 1
    for n in reversed(size):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _gather(flat: np.ndarray, size, stride, offset, numel) -> np.ndarray:
    """Copy of the (already bounds-checked) view; numpy checks every index again."""
    if numel == 0:
        return np.zeros(size, flat.dtype)
    keep = [(n, s) for n, s in zip(size, stride) if n != 1]  # size-1 dims: stride irrelevant
    if [s for _, s in keep] == list(_contiguous_strides(tuple(n for n, _ in keep))):
        return flat[offset : offset + numel].reshape(size).copy()
    index = np.asarray(offset, np.int64)
    for n, s in zip(size, stride):
        index = index[..., None] + np.arange(n, dtype=np.int64) * s
    return flat[index]


class _Materialiser:
    """Turns `_TensorRef`s into numpy arrays, each checked, within a total byte budget."""

    def __init__(self, storages: _Storages, source: str, file_bytes: int):
        self._storages, self._source = storages, source
        self._done: dict[int, np.ndarray] = {}
        self._budget = MAX_EXPANSION * file_bytes + _SLACK_BYTES
        self._spent = 0

    def __call__(self, ref: _TensorRef, name: str) -> np.ndarray:
        if id(ref) in self._done:  # the same tensor under two names (tied weights)
            return self._done[id(ref)]
        where = f"{self._source}: tensor {name!r}"
        st_dtype, st_name, dtype = _tensor_dtype(ref, where)
        flat = self._storages.get(ref.storage, st_dtype, st_name, where)
        if dtype != st_dtype:
            if flat.nbytes % dtype.itemsize:
                raise CheckpointError(
                    f"{where}: untyped storage of {flat.nbytes} bytes is not a whole number "
                    f"of {dtype} elements"
                )
            flat = flat.view(dtype)
        size, stride, offset, numel = _check_view(ref, flat.size, where)
        self._spent += numel * dtype.itemsize
        if self._spent > self._budget:
            raise CheckpointError(
                f"{where}: the tensors so far take {self._spent} bytes, over the budget of "
                f"{self._budget} ({MAX_EXPANSION}x the file's bytes + {_SLACK_BYTES >> 20} MiB; "
                "one storage viewed many times?)"
            )
        arr = _gather(flat, size, stride, offset, numel)
        self._done[id(ref)] = arr
        return arr


def _collect_tensors(obj, materialise) -> dict[str, np.ndarray]:
    """TorchScript module tree / (nested) state dict -> {dotted name: array}.

    Iterative; each container is entered once (a shared or cyclic reference is not walked
    again); string keys only; bounded depth and number of entries.
    """
    out: dict[str, np.ndarray] = {}
    seen: set[int] = set()
    stack = [(obj, "", 0)]
    entries = 0
    while stack:
        o, prefix, depth = stack.pop()
        if isinstance(o, _TensorRef):
            if prefix:
                out[prefix[:-1]] = materialise(o, prefix[:-1])
            continue
        if not isinstance(o, dict) or id(o) in seen:
            continue
        seen.add(id(o))
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{prefix[:-1]!r} is nested deeper than {MAX_DEPTH} levels")
        items = [(k, v) for k, v in o.items() if isinstance(k, str)]
        entries += len(items)
        if entries > MAX_ENTRIES:
            raise CheckpointError(f"more than {MAX_ENTRIES} entries in the object tree")
        for k, v in reversed(items):  # reversed: names come out in file order
            stack.append((v, f"{prefix}{k}.", depth + 1))
    return out


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript archive or a zip-format ``torch.save`` file, without torch
    and without executing code from the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_zip(zf, path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any damage of the zip/pickle, named with the file
        raise CheckpointError(f"{path}: unreadable torch zip ({type(e).__name__}: {e})") from e


def _read_zip(zf: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: expected one <root>/data.pkl in the zip, found {pkls}")
    root = pkls[0].split("/")[0]
    info = zf.getinfo(pkls[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: data.pkl is {info.file_size} bytes (limit {MAX_PICKLE_BYTES})"
        )
    byteorder = "<"
    if f"{root}/byteorder" in zf.namelist():
        order = zf.read(f"{root}/byteorder").strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byteorder {order[:20]!r}")
        byteorder = "<" if order == b"little" else ">"
    try:
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated/garbled pickle, wrong call arguments
        raise CheckpointError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    file_bytes = sum(i.file_size for i in zf.infolist() if i.compress_type == zipfile.ZIP_STORED)
    storages = _Storages(zf, root, path, byteorder)
    try:
        sd = _collect_tensors(obj, _Materialiser(storages, path, file_bytes))
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    if not sd:
        raise CheckpointError(f"{path}: no tensors found")
    return sd


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """``.pt``/``.bin``: zip formats via ``read_torch_zip``; legacy pickles need torch."""
    if zipfile.is_zipfile(path):
        return read_torch_zip(path)
    try:
        import torch  # noqa: PLC0415 -- optional: only legacy (non-zip) files need it
    except ImportError as e:
        raise CheckpointError(
            f"{path}: legacy (non-zip) torch file; install torch to read it "
            "with torch.load(weights_only=True)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file name
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in obj.items()
        if hasattr(v, "numpy")
    }
