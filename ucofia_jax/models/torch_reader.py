"""Tensors of PyTorch zip files (``torch.save`` since 1.6, TorchScript archives) without torch
and without running code from the file.

A zip-format ``.pt``/``.bin`` holds ``<root>/data.pkl`` (the object tree, a pickle) and one
raw byte file per storage (``<root>/data/<key>``; little-endian unless ``<root>/byteorder``
says ``big``). The pickle names a few
torch callables to rebuild tensors; here a restricted unpickler maps exactly those names to
inert records (`_TensorRef`, `_StorageRef`) and refuses every other global. Nothing is read
from the storages while unpickling: once the tree is loaded, each tensor is validated and
materialised under its dotted name, so an error names the file, the tensor and the problem.

Memory safety: a pickled tensor is a view ``(storage, offset, size, stride)`` chosen by
whoever wrote the file. Before any storage byte is read every view is checked: integer
offset, sizes and strides (no bools, no negatives), at most `MAX_DIMS` dimensions, the
element count within `MAX_TENSOR_ELEMENTS`, the largest index
``offset + sum((size_i - 1) * stride_i)`` inside the storage, a known dtype, and the
storage's byte count equal to its declared element count times the item size. The object
walk is iterative, visits each container once (shared and cyclic references cannot blow it
up), and is bounded in depth and entries.

Memory bound (every allocation the reader makes, counted against bytes it has read):

* a zip entry (data.pkl, a storage) is read only if its stated size fits in the file on
  disk, and the storages read together never exceed the file's size: a size claimed in the
  zip's directory buys nothing;
* the tensors are copies; their bytes together are at most ``MAX_EXPANSION`` times the
  storage bytes actually read plus a fixed cap (`DEFAULT_CAP_MIB`, raised with the
  environment variable ``UCOFIA_PT_READER_CAP_MIB`` or ``cap_bytes=``), checked for all
  tensors before the first one is allocated;
* a view is copied through ``np.lib.stride_tricks.as_strided`` over the storage (bounds
  checked above) into the output: no index array, no intermediate copy, and a byte swap
  (big-endian files) happens inside that one copy.

* the unpickled object tree is estimated from data.pkl's opcodes before it is built
  (`_BYTES_PER_OPCODE` each plus their strings; sets, which no weights file has, are
  refused) and must fit in the same cap.

So a file of ``F`` bytes costs at most about ``F`` (data.pkl and storages) plus
``MAX_EXPANSION * F + cap`` (the tensors) plus ``cap`` (the object tree)
(`tests/test_reader_bounds.py` measures it with tracemalloc).

Legacy (pre-1.6, non-zip) files: every pickle before the storages goes through the same
restricted unpickler first (a refused global is named, the magic number checked, the bytes
the storages declare must fit in the file), then ``torch.load(weights_only=True)`` reads the
storages when torch is installed; its tensors are returned as numpy views of them (no
copies). Legacy storages are little-endian whatever the writer's machine (torch swaps on
write and read).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import reprlib
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np

from ucofia_jax.errors import CheckpointError, ConfigError

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
# What one pickle opcode can make the unpickler hold at most, beyond its argument (an empty
# dict and the list slot that keeps it: 82 bytes, the most of the patterns that
# tests/test_reader_bounds.py measures). The object tree is estimated from the opcodes
# before it is built and must fit in the cap, as the tensors must.
_BYTES_PER_OPCODE = 128
# Sets never occur in a weights pickle, and an empty one costs 233 bytes per opcode byte.
_REFUSED_OPCODES = frozenset({"EMPTY_SET", "ADDITEMS", "FROZENSET"})
MAX_DEPTH = 100  # nesting of dicts in the object tree (TorchScript: module depth ~ 10)
MAX_ENTRIES = 10_000_000  # dict items visited in the object tree
# Materialised bytes may exceed the storage bytes read (expanded views, one storage viewed
# many times) but only by this factor plus a fixed cap: a small file cannot ask for gigabytes.
MAX_EXPANSION = 4
DEFAULT_CAP_MIB = 64  # an expanded view of a small storage (e.g. a mask) up to this size loads
CAP_ENV = "UCOFIA_PT_READER_CAP_MIB"  # raises the cap (MiB) for a trusted file that needs more
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
_LEGACY_PICKLES = 4  # magic number, protocol version, sys_info, the object tree

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


class _StorageType:
    """The global ``torch.<Name>Storage`` (or ``torch.storage.UntypedStorage``)."""

    __slots__ = ("name",)  # one per GLOBAL opcode: small, as `_BYTES_PER_OPCODE` assumes

    def __init__(self, name: str):
        self.name = name


class _DtypeName:
    """The global ``torch.<dtype>`` (third argument of ``_rebuild_tensor_v3``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _StorageRef:
    """A persistent id ``('storage', type, key, location, numel)``: not read yet."""

    __slots__ = ("storage_type", "key", "numel")

    def __init__(self, storage_type, key, numel):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _TensorRef:
    """What ``_rebuild_tensor_v2/v3`` was asked to build; checked when it gets a name."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype_name")

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
        self.storages: dict = {}  # key -> the first `_StorageRef` naming it
        self._inert_globals: dict = {}  # (class, name) -> its one stand-in

    def _inert(self, cls, name: str):
        # One stand-in per name: a pickle naming the same global a million times holds one.
        return self._inert_globals.setdefault((cls, name), cls(name))

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
            return self._inert(
                _StorageType, name
            )  # an unknown one is refused with the tensor's name
        if module == "torch.storage" and name == "UntypedStorage":
            return self._inert(_StorageType, name)
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name.isidentifier() and name.islower():
            return self._inert(_DtypeName, name)  # only meaningful as _rebuild_tensor_v3's dtype
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
        ref = _StorageRef(pid[1], pid[2], numel)
        if isinstance(ref.key, str):
            self.storages.setdefault(ref.key, ref)
        return ref


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def cap_bytes_from_env() -> int:
    """The fixed part of the tensor budget: `CAP_ENV` (MiB) if set, else `DEFAULT_CAP_MIB`."""
    raw = os.environ.get(CAP_ENV, "").strip()
    if not raw:
        return DEFAULT_CAP_MIB << 20
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ConfigError(f"{CAP_ENV}={raw!r}: expected a whole number of MiB >= 0")
    return mib << 20


def _object_tree_bytes(source, path: str, cap: int) -> int:
    """An upper bound of what unpickling one pickle (``source``: its bytes, or a file at its
    start, left after its STOP) makes the unpickler hold, from its opcodes: refused once it
    passes ``cap``, so the scan itself stops after ``cap / _BYTES_PER_OPCODE`` opcodes."""
    total = 0
    for op, arg, pos in pickletools.genops(source):
        if op.name in _REFUSED_OPCODES:
            raise CheckpointError(
                f"{path}: the pickle builds a set ({op.name} at byte {pos}); a weights file "
                "has none"
            )
        total += _BYTES_PER_OPCODE
        if isinstance(arg, (str, bytes, bytearray)):
            total += 4 * len(arg)  # a str holds up to 4 bytes per character
        elif _is_int(arg):
            total += arg.bit_length() // 8  # LONG1/LONG4: an int of that many bytes
        if total > cap:
            raise CheckpointError(
                f"{path}: the pickle's objects would take more than {cap} bytes (about "
                f"{_BYTES_PER_OPCODE} per opcode and its strings, to byte {pos}); "
                f"{CAP_ENV} raises the MiB for a trusted file"
            )
    return total


class _Zip:
    """The zip's entries, read only when their stated size fits in the file on disk."""

    def __init__(self, zf: zipfile.ZipFile, path: str):
        self.zf, self.path = zf, path
        self.disk_bytes = os.fstat(zf.fp.fileno()).st_size if zf.fp else 0
        self.storage_bytes_read = 0

    def check_fits(self, info: zipfile.ZipInfo, where: str) -> None:
        # zipfile asks the OS for the stated size in one read (a buffer of that size): a lying
        # central directory must not get to allocate more than the file holds.
        if info.header_offset + info.compress_size > self.disk_bytes:
            raise CheckpointError(
                f"{where}: zip entry {info.filename} claims {info.compress_size} bytes at "
                f"offset {info.header_offset}, past the end of the {self.disk_bytes}-byte file"
            )

    def read(self, info: zipfile.ZipInfo, where: str) -> bytes:
        self.check_fits(info, where)
        raw = self.zf.read(info)  # checks the entry's CRC
        if len(raw) != info.file_size:
            raise CheckpointError(f"{where}: zip entry {info.filename} is truncated")
        return raw


class _Storages:
    """Each storage file of the zip: checked against every view of it, then read once."""

    def __init__(self, archive: _Zip, root: str):
        self._archive, self._root = archive, root
        self._seen: dict[str, tuple] = {}  # key -> (dtype name, numel, ZipInfo)
        self._raw: dict[str, np.ndarray] = {}  # key -> the storage's bytes (uint8)

    def info(self, ref: _StorageRef, dtype: np.dtype, dtype_name: str, where: str):
        """The storage's zip entry, after checking its key, compression and byte count."""
        key = ref.key
        if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
            raise CheckpointError(f"{where}: bad storage key {_short.repr(key)}")
        if key in self._seen:
            seen_dtype, seen_numel, info = self._seen[key]
            if (seen_dtype, seen_numel) != (dtype_name, ref.numel):
                raise CheckpointError(
                    f"{where}: storage {key} is declared as {dtype_name} x {ref.numel} here "
                    f"and as {seen_dtype} x {seen_numel} elsewhere"
                )
            return info
        name = f"{self._root}/data/{key}"
        try:
            info = self._archive.zf.getinfo(name)
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
        self._seen[key] = (dtype_name, ref.numel, info)
        return info

    def read(self, key: str, where: str) -> np.ndarray:
        """The bytes of storage ``key`` (checked by `info` before), read once."""
        if key not in self._raw:
            info = self._seen[key][2]
            archive = self._archive
            archive.check_fits(info, where)
            # Storages of a real file are disjoint parts of it: together they fit in it. Entries
            # that overlap (or a directory that lies) would read the same bytes many times.
            if archive.storage_bytes_read + info.file_size > archive.disk_bytes:
                raise CheckpointError(
                    f"{where}: the storages read so far and {info.filename} take "
                    f"{archive.storage_bytes_read + info.file_size} bytes, more than the "
                    f"{archive.disk_bytes}-byte file holds (overlapping zip entries?)"
                )
            raw = archive.read(info, where)
            archive.storage_bytes_read += len(raw)
            self._raw[key] = np.frombuffer(raw, np.uint8)  # a view of the bytes: no copy
        return self._raw[key]


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
    if math.prod(n for n in size if n) > MAX_TENSOR_ELEMENTS:
        # Empty, yet numpy cannot even make the shape (its other sizes overflow an index).
        raise CheckpointError(
            f"{where}: size {size} is empty but its non-zero sizes multiply past "
            f"{MAX_TENSOR_ELEMENTS} (huge)"
        )
    if numel == 0:
        return size, stride, offset, 0  # reads nothing: any offset is harmless (torch agrees)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= n_storage:
        raise CheckpointError(
            f"{where}: view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last} but the storage has {n_storage} elements"
        )
    return size, stride, offset, numel


class _Checked:
    """A tensor whose view has been checked against its storage's entry (nothing read yet)."""

    def __init__(self, where, storage_key, dtype, size, stride, offset, numel):
        self.where, self.storage_key, self.dtype = where, storage_key, dtype
        self.size, self.stride, self.offset, self.numel = size, stride, offset, numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _check_tensor(ref: _TensorRef, storages: _Storages, where: str) -> _Checked:
    st_dtype, st_name, dtype = _tensor_dtype(ref, where)
    info = storages.info(ref.storage, st_dtype, st_name, where)
    if info.file_size % dtype.itemsize:
        raise CheckpointError(
            f"{where}: untyped storage of {info.file_size} bytes is not a whole number "
            f"of {dtype} elements"
        )
    size, stride, offset, numel = _check_view(ref, info.file_size // dtype.itemsize, where)
    return _Checked(where, ref.storage.key, dtype, size, stride, offset, numel)


def _copy_view(raw: np.ndarray, t: _Checked, byteorder: str) -> np.ndarray:
    """The view ``t`` of the storage bytes ``raw`` (elements in ``byteorder``, '<' or '>') as
    a new C-contiguous array in native byte order: one allocation, the size of the result
    (``_check_view`` bounded every index the strided view can reach)."""
    out = np.empty(t.size, t.dtype)
    if t.numel == 0:
        return out
    itemsize = t.dtype.itemsize
    # Copy as the unsigned integer of the same width in the file's byte order: numpy swaps
    # while it copies when that order is not native, for every dtype (ml_dtypes' bfloat16 and
    # float8 included); in native order it is a plain copy.
    elements = raw.view(np.dtype(f"u{itemsize}").newbyteorder(byteorder))
    view = np.lib.stride_tricks.as_strided(
        elements[t.offset :],
        shape=t.size,
        strides=tuple(s * itemsize for s in t.stride),
        writeable=False,
    )
    np.copyto(out.view(f"u{itemsize}"), view)
    return out


def _collect_refs(obj) -> dict[str, _TensorRef]:
    """TorchScript module tree / (nested) state dict -> {dotted name: tensor record}.

    Iterative; each container is entered once (a shared or cyclic reference is not walked
    again); string keys only; bounded depth and number of entries.
    """
    out: dict[str, _TensorRef] = {}
    seen: set[int] = set()
    stack = [(obj, "", 0)]
    entries = 0
    while stack:
        o, prefix, depth = stack.pop()
        if isinstance(o, _TensorRef):
            if prefix:
                out[prefix[:-1]] = o
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


def read_torch_zip(path: str, *, cap_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript archive or a zip-format ``torch.save`` file, without torch
    and without executing code from the file. ``cap_bytes``: the fixed part of the tensor
    budget (default: `cap_bytes_from_env`)."""
    cap = cap_bytes_from_env() if cap_bytes is None else cap_bytes
    return _with_zip(path, lambda archive: _read_zip(archive, cap))


def read_torch_zip_shapes(path: str) -> dict[str, tuple[tuple, np.dtype]]:
    """{name: (shape, dtype)} of a zip-format torch file: its data.pkl read and every view
    checked against its storage's entry, no storage byte read."""
    return _with_zip(path, _zip_shapes)


def _with_zip(path: str, body):
    try:
        with zipfile.ZipFile(path) as zf:
            return body(_Zip(zf, path))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any damage of the zip/pickle, named with the file
        raise CheckpointError(f"{path}: unreadable torch zip ({type(e).__name__}: {e})") from e


def _checked_tensors(archive: _Zip, cap: int) -> tuple[_Storages, dict[str, _Checked], str]:
    """(storages, {name: checked view}, byte order '<' or '>'): everything but the storages'
    bytes, read and checked (the object tree within ``cap``)."""
    zf, path = archive.zf, archive.path
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
        order_info = zf.getinfo(f"{root}/byteorder")
        order = archive.read(order_info, path).strip() if order_info.file_size < 64 else b"?"
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byteorder {order[:20]!r}")
        byteorder = "<" if order == b"little" else ">"
    try:
        data = archive.read(info, path)
        _object_tree_bytes(data, path, cap)
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
        del data
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated/garbled pickle, wrong call arguments
        raise CheckpointError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    storages = _Storages(archive, root)
    checked: dict[str, _Checked] = {}
    by_ref: dict[int, _Checked] = {}  # the same tensor under two names (tied weights)
    try:
        for name, ref in _collect_refs(obj).items():
            if id(ref) not in by_ref:
                by_ref[id(ref)] = _check_tensor(ref, storages, f"{path}: tensor {name!r}")
            checked[name] = by_ref[id(ref)]
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    if not checked:
        raise CheckpointError(f"{path}: no tensors found")
    return storages, checked, byteorder


def _zip_shapes(archive: _Zip) -> dict[str, tuple[tuple, np.dtype]]:
    _, checked, _ = _checked_tensors(archive, cap_bytes_from_env())
    return {name: (t.size, t.dtype) for name, t in checked.items()}


def _read_zip(archive: _Zip, cap: int) -> dict[str, np.ndarray]:
    storages, checked, byteorder = _checked_tensors(archive, cap)
    unique = list({id(t): t for t in checked.values()}.values())
    for t in unique:
        storages.read(t.storage_key, t.where)
    # Every tensor is a new array: all of them are counted before the first is allocated.
    budget = MAX_EXPANSION * archive.storage_bytes_read + cap
    spent = 0
    for t in unique:
        spent += t.nbytes
        if spent > budget:
            raise CheckpointError(
                f"{t.where}: the tensors so far take {spent} bytes, over the budget of "
                f"{budget} ({MAX_EXPANSION}x the {archive.storage_bytes_read} storage bytes "
                f"read + {cap >> 20} MiB; one storage viewed many times? {CAP_ENV} raises "
                "the MiB for a trusted file)"
            )
    arrays = {
        id(t): _copy_view(storages.read(t.storage_key, t.where), t, byteorder) for t in unique
    }
    return {name: arrays[id(t)] for name, t in checked.items()}


def read_torch_file(path: str, *, cap_bytes: int | None = None) -> dict[str, np.ndarray]:
    """``.pt``/``.bin``: zip formats via ``read_torch_zip``; legacy pickles need torch."""
    if zipfile.is_zipfile(path):
        return read_torch_zip(path, cap_bytes=cap_bytes)
    _prescan_legacy(path, cap_bytes_from_env() if cap_bytes is None else cap_bytes)
    return _read_legacy(path)


def read_torch_shapes(path: str) -> dict[str, tuple[tuple, np.dtype]]:
    """{name: (shape, dtype)} of a ``.pt``/``.bin`` file, its object tree read and checked
    (code globals refused, zip views checked against their storages), no storage read."""
    if zipfile.is_zipfile(path):
        return read_torch_zip_shapes(path)
    refs = _collect_refs(_prescan_legacy(path, cap_bytes_from_env()))
    out = {}
    for name, ref in refs.items():
        where = f"{path}: tensor {name!r}"
        dtype = _tensor_dtype(ref, where)[2]
        if not isinstance(ref.size, tuple) or not all(_is_int(n) and n >= 0 for n in ref.size):
            raise CheckpointError(f"{where}: size {_short.repr(ref.size)} must be ints >= 0")
        out[name] = (ref.size, dtype)
    if not out:
        raise CheckpointError(f"{path}: no tensors found")
    return out


def _prescan_legacy(path: str, cap: int):
    """The pickles of a legacy (non-zip) torch file before its storages, through the same
    restricted unpickler: a global other than torch's tensor rebuilders is refused and named
    here, before torch sees the file, and so is a file whose storages declare more bytes
    than it holds (torch allocates each storage at its declared size before reading it).
    Returns the object tree (tensor records)."""
    objs = []
    try:
        with open(path, "rb") as f:
            disk_bytes = os.fstat(f.fileno()).st_size
            tree_bytes = 0
            for _ in range(_LEGACY_PICKLES):
                start = f.tell()  # each pickle's objects are costed first, within the cap
                tree_bytes += _object_tree_bytes(f, path, cap - tree_bytes)
                f.seek(start)
                unpickler = _RestrictedUnpickler(f, path)
                objs.append(unpickler.load())
                if len(objs) == 1 and not (_is_int(objs[0]) and objs[0] == LEGACY_MAGIC):
                    raise CheckpointError(
                        f"{path}: neither a zip nor a legacy torch file (a pickle of "
                        f"{type(objs[0]).__name__}, not torch's magic number)"
                    )
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated/garbled pickle stream, named with the file
        raise CheckpointError(
            f"{path}: unreadable legacy torch file ({type(e).__name__}: {e})"
        ) from e
    declared = 0
    for key, ref in unpickler.storages.items():
        name = ref.storage_type.name if isinstance(ref.storage_type, _StorageType) else None
        dtype = np.dtype(np.uint8) if name == "UntypedStorage" else STORAGE_DTYPES.get(name)
        if dtype is None or not _is_int(ref.numel) or ref.numel < 0:
            raise CheckpointError(
                f"{path}: storage {key} of type {_short.repr(name)} declares "
                f"{_short.repr(ref.numel)} elements (known types: {', '.join(STORAGE_DTYPES)})"
            )
        declared += ref.numel * dtype.itemsize
    if declared > disk_bytes:
        raise CheckpointError(
            f"{path}: its storages declare {declared} bytes, more than the "
            f"{disk_bytes}-byte file holds"
        )
    obj = objs[-1]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def _read_legacy(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 -- optional: only legacy (non-zip) files need it
    except ImportError as e:
        raise CheckpointError(
            f"{path}: legacy (non-zip) torch file; install torch to read it "
            "with torch.load(weights_only=True)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False (running the file's code): never shown.
        raise CheckpointError(
            f"{path}: refused by torch's restricted loader: {_reason(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 -- re-raised with the file name
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {_reason(e)}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(v.dtype).removeprefix("torch.")
        if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):  # numpy has no such dtype:
            # the same bits as ml_dtypes' (the zip path returns these too), through an int view
            # (a view, as torch's other tensors: an expanded view is not materialised)
            bits = v.view(torch.int16 if v.dtype.itemsize == 2 else torch.uint8)
            out[k] = bits.numpy().view(TENSOR_DTYPES[name])
        else:
            out[k] = v.numpy()
    return out


def _reason(e: Exception) -> str:
    """One line of an exception's message. For torch's refusals, the first sentence of its
    reason (``WeightsUnpickler error: ...``), without the advice around it: to load with
    ``weights_only=False`` (run the file's code) or to allow-list the global."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours part of its message
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker) :]
    line = next((x.strip() for x in text.splitlines() if x.strip()), type(e).__name__)
    if isinstance(e, pickle.UnpicklingError):
        line = line.split(". ")[0]
    return line if len(line) <= 200 else line[:197] + "..."
