"""MSVD (CLIP4Clip layout; dataloader_msvd_retrieval.py).

  RAW/train_list.txt, val_list.txt, test_list.txt   one video id per line
  RAW/raw-captions.pkl     {video_id: [[token, ...], ...]}; a caption = tokens joined by spaces
  RAW/videos/<video_id>.avi (or .mp4/.webm/.mkv)

The pickle is read with a restricted unpickler that admits only builtins dict/list/str/tuple:
a pickle can name any importable callable and run it while loading, so an annotation file
from the internet must not be unpickled with `pickle.load`.
Every caption is a training sample (``expand_sentences=True``); evaluation is multi-sentence
(one record per video with all captions, the default).
"""

from __future__ import annotations

import io
import os
import pickle

from data_pipeline.datasets import _common as C
from data_pipeline.records import DataError, DatasetSpec

NAME = "msvd"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "val", "test"),
    files={
        "*": ("raw-captions.pkl",),
        "train": ("train_list.txt",),
        "val": ("val_list.txt",),
        "test": ("test_list.txt",),
    },
    source="CLIP4Clip's msvd_data.zip + YouTubeClips.tar; val_list.txt is built but "
    "unused by the recipe",
)
_ALLOWED = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "str"),
    ("builtins", "tuple"),
    ("__builtin__", "dict"),
    ("__builtin__", "list"),
    ("__builtin__", "str"),
    ("__builtin__", "tuple"),
    ("__builtin__", "unicode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f, encoding="utf-8")
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(
            f"{self._path}: refusing to unpickle {module}.{name}; only dict, list, "
            f"str and tuple are allowed in a captions file"
        )

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refusing persistent id {pid!r} in a captions file")


# MSVD's raw-captions.pkl is ~2 MB with ~600k objects; the bounds leave room for far larger
# sets while refusing files built to exhaust memory or time.
MAX_PICKLE_BYTES = 256 << 20
MAX_OBJECTS = 50_000_000


def _check_types(obj, path):
    """Only dict/list/tuple/str, visiting each container once: a pickle can share one object
    many times (each level of ``[x, x]`` doubles the paths to it), so walking paths instead of
    objects takes time exponential in the file size. Also bounds the number of objects."""
    seen: set[int] = set()
    stack = [obj]
    visited = 0
    while stack:
        o = stack.pop()
        visited += 1
        if visited > MAX_OBJECTS:
            raise DataError(f"{path}: more than {MAX_OBJECTS} objects in a captions file")
        if isinstance(o, str):
            continue
        if not isinstance(o, (dict, list, tuple)):
            raise DataError(
                f"{path}: unexpected {type(o).__name__} in a captions file; only dict, "
                f"list, str and tuple are allowed"
            )
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        else:
            stack.extend(o)


def load_captions_pickle(path: str):
    """raw-captions.pkl through the restricted unpickler; raises DataError naming the file."""
    size = os.path.getsize(path)
    if size > MAX_PICKLE_BYTES:
        raise DataError(
            f"{path}: {size} bytes, more than the {MAX_PICKLE_BYTES} a captions file may have"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated, not a pickle, py2 bytes that are not UTF-8, ...
        raise DataError(f"{path}: cannot read pickle ({type(e).__name__}: {e})") from e
    # Opcodes such as EMPTY_SET or BINBYTES build objects without find_class; they cannot run
    # code, but the file is then not what a captions file should be.
    _check_types(obj, path)
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a dict video_id -> list of token lists, got {type(obj).__name__}"
        )
    return obj


def _caption_text(tokens):
    """A caption is a list of tokens, joined by spaces; some re-exports store joined strings."""
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    if isinstance(tokens, str):
        return tokens
    return C.Unreadable("expected a list of tokens")


def _video(where, entry):
    video_id, captions = entry
    return video_id, [(f"{where}[{j}]", _caption_text(t)) for j, t in enumerate(captions)]


def videos(root, split, report, strict):
    """The listed videos with all their captions in the pickle."""
    list_path = C.require_file(root, f"{split}_list.txt", NAME)
    pkl_path = C.require_file(root, "raw-captions.pkl", NAME)
    captions = load_captions_pickle(pkl_path)
    entries = C.listed_entries(
        list_path, captions, pkl_path, report, strict, entry_types=(list, tuple)
    )
    return list(C.group_captions(entries, _video, report, strict, keep_empty=True).items())


read_split = C.make_read_split(NAME, SPLITS, videos)
