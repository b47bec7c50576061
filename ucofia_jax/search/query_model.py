"""The query side of the model that made an index, kept in the index.

A query encodes text and scores stored features: it needs CLIP's text tower, ``logit_scale``
and the head, not the vision tower. ``index`` saves those parameters in the index (`FILE`,
safetensors: no pickle) with the model's config, source and fingerprint, and with the query's
two programs exported by ``jax.export`` from the model's public methods:

* ``text``: token ids 't w' -> the text features (``Model.encode_text``) and the shortlist
  query vectors (``Model.coarse_query``);
* ``score``: one text's features and K stored videos' -> the full score 't k'
  (``Model.score(...).mean()``, the XLA pair function), K symbolic: any shortlist size.

``load`` gives a :class:`CompiledQueryModel` that runs those programs: no checkpoint restore,
no ``Model.init`` shape pass, no Flax and no tracing, which is what lets a ``query`` process
answer in about two seconds (docs/search.md, "Speed"). Where the programs cannot be used
(another JAX whose deserializer refuses them, another platform, a ``clip_only`` model) it
gives the query-only :class:`~ucofia_jax.search.source.SearchModel` over the same saved
parameters, which traces as usual (and the programs are exported again where the index can be
written). An index keeps answering after its training run moves or is deleted. A file whose
fingerprint is not the index's, or that cannot be read, is ignored: the caller loads the
model's source.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional, Sequence

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from ucofia_jax.models import tokenizer

if TYPE_CHECKING:  # Flax comes with these; the compiled path never imports them
    from ucofia_jax.search.source import SearchModel

FILE = "query_model.safetensors"
FORMAT = "1"
# Parameters a query never reads: the vision tower (videos are encoded by `index` only).
VIDEO_ONLY = (("clip", "visual"),)
# The exported programs are stored as uint8 tensors under this prefix (no parameter has it).
PROGRAMS = "__programs__"
VIDEO_COLUMNS = ("vector", "frames", "pixels", "mask")  # the stored features score reads
_SEP = "/"


def path_in(index_dir: str | os.PathLike) -> Path:
    return Path(index_dir) / FILE


class CompiledText(NamedTuple):
    """Text features as the exported programs give them ('t d', 't w d', 't w' or None) and
    the shortlist query vectors 't d'."""

    sentence: Any
    words: Any
    mask: Any
    query: Any


class CompiledQueryModel:
    """An index's query model running its exported programs: the query side of
    ``SearchModel`` (``encode_texts``, ``shortlist_query``, ``score``), same numbers."""

    query_only = True
    clip_only = False

    def __init__(self, meta: Dict[str, str], params, text_program, score_program):
        self.fingerprint = meta["fingerprint"]
        self.max_words = int(json.loads(meta["config"])["data"]["max_words"])
        self.params = params
        self._text = jax.jit(text_program.call)
        self._score = jax.jit(score_program.call)

    def encode_texts(self, texts: Sequence[str]) -> CompiledText:
        ids, _ = tokenizer.tokenize(list(texts), self.max_words)
        return CompiledText(*jax.tree.map(np.asarray, self._text(self.params, ids)))

    def shortlist_query(self, text: CompiledText) -> np.ndarray:
        return np.asarray(text.query, np.float32)

    def score(self, text: CompiledText, video: Dict[str, np.ndarray]) -> np.ndarray:
        columns = [video[c] for c in VIDEO_COLUMNS]
        return np.asarray(self._score(self.params, text.sentence, text.words, text.mask, *columns))


# ---------------------------------------------------------------------------- writing


def _flat(params, prefix=()) -> Dict[str, np.ndarray]:
    out = {}
    for key, value in params.items():
        path = (*prefix, str(key))
        if path in VIDEO_ONLY:
            continue
        if isinstance(value, dict):
            out.update(_flat(value, path))
        else:
            out[_SEP.join(path)] = np.asarray(jax.device_get(value))
    return out


def export_programs(
    model: SearchModel, params, feature_shapes: Dict[str, list]
) -> Dict[str, bytes]:
    """The serialized ``text`` and ``score`` programs of ``model`` (see the module doc) for
    parameters shaped like ``params`` and stored features of ``feature_shapes`` (the index's
    per-video shapes); {} for a ``clip_only`` model (its score is a cosine)."""
    if model.clip_only:
        return {}
    # With Flax, which `index` has loaded anyway; a compiled query never comes here.
    from ucofia_jax.models.features import TextFeatures, VideoFeatures  # noqa: PLC0415

    net = model.model

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    def text_program(p, ids):
        text = net.encode_text(p, ids)
        return (text.sentence, text.words, text.mask, net.coarse_query(p, text.sentence))

    def score_program(p, sentence, words, mask, vector, frames, pixels, frame_mask):
        text = TextFeatures(sentence=sentence, words=words, mask=mask)
        video = VideoFeatures(video=vector, frames=frames, pixels=pixels, mask=frame_mask)
        return net.score(p, text, video).mean()

    words = int(model.config.data.max_words)
    t, k = jax.export.symbolic_shape("t, k")
    param_specs = jax.tree.map(spec, params)
    one = jax.eval_shape(text_program, param_specs, jax.ShapeDtypeStruct((1, words), np.int32))
    one_text = [None if x is None else spec(x) for x in one[:3]]
    video = [
        jax.ShapeDtypeStruct((k, *feature_shapes[c]), np.int32 if c == "mask" else np.float32)
        for c in VIDEO_COLUMNS
    ]
    platforms = sorted({"cpu", jax.default_backend()})
    text_ids = jax.ShapeDtypeStruct((t, words), np.int32)
    exported = {
        "text": jax.export.export(jax.jit(text_program), platforms=platforms)(
            param_specs, text_ids
        ),
        "score": jax.export.export(jax.jit(score_program), platforms=platforms)(
            param_specs, *one_text, *video
        ),
    }
    return {name: bytes(e.serialize()) for name, e in exported.items()}


def save(model: SearchModel, index_dir: str | os.PathLike, feature_shapes: Dict[str, list]) -> Path:
    """Writes ``model``'s query parameters and programs into the index (atomically: a reader
    sees the old file or the new one); ``feature_shapes``: the index's ``meta['shapes']``.
    Raises OSError where the index cannot be written."""
    tensors, dtypes, shapes = {}, {}, {}
    for key, x in _flat(model.params).items():
        shapes[key] = list(x.shape)  # safetensors keeps a 0-d array as shape (1,)
        if x.dtype.kind == "V" or x.dtype.name == "bfloat16":  # not a numpy dtype: raw bits
            dtypes[key] = x.dtype.name
            x = x.view(np.uint16)
        tensors[key] = np.ascontiguousarray(x)
    programs = export_programs(model, _nested(dict(tensors), shapes, dtypes), feature_shapes)
    for name, blob in programs.items():
        tensors[f"{PROGRAMS}{_SEP}{name}"] = np.frombuffer(blob, np.uint8)
    metadata = {
        "format": FORMAT,
        "fingerprint": model.fingerprint,
        "source": json.dumps(model.source.to_dict(), sort_keys=True),
        "config": model.config.to_json(sort_keys=True),
        "description": json.dumps(model.description, sort_keys=True, default=list),
        "step": json.dumps(model.step),
        "dtypes": json.dumps(dtypes, sort_keys=True),
        "shapes": json.dumps(shapes, sort_keys=True),
        "programs": json.dumps({"jax": jax.__version__, "names": sorted(programs)}),
    }
    target = path_in(index_dir)
    tmp = target.with_name(f".{FILE}.{uuid.uuid4().hex}")
    try:
        # Plain open() follows the umask (safetensors' save_file writes mode 0600).
        with open(tmp, "wb") as f:
            f.write(safetensors_bytes(tensors, metadata=metadata))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------------------- reading


def _nested(flat: Dict[str, np.ndarray], shapes, dtypes) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith(PROGRAMS + _SEP):
            continue
        if key in dtypes:
            value = value.view(np.dtype(dtypes[key]))
        *parents, leaf = key.split(_SEP)
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.reshape(shapes[key])
    return out


def fingerprint_of_file(index_dir: str | os.PathLike) -> Optional[str]:
    """The fingerprint the index's query model file was saved with; None without one."""
    try:
        with safe_open(str(path_in(index_dir)), framework="numpy") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):
        return None


def _programs(flat: Dict[str, np.ndarray], meta: Dict[str, str]):
    """The deserialized (text, score) programs if this JAX runs them here, else None."""
    info = json.loads(meta.get("programs", "{}"))
    if info.get("jax") != jax.__version__ or info.get("names") != ["score", "text"]:
        return None  # another JAX's serialization: re-exported from the parameters
    try:
        text, score = (
            jax.export.deserialize(bytearray(flat[f"{PROGRAMS}{_SEP}{n}"].tobytes()))
            for n in ("text", "score")
        )
    except (KeyError, ValueError):
        return None
    if jax.default_backend() not in text.platforms:
        return None
    return text, score


def load(
    index_dir: str | os.PathLike,
    fingerprint: str,
    feature_shapes: Dict[str, list],
    *,
    compiled: bool = True,
):
    """The query model saved in the index, if its fingerprint is ``fingerprint``: a
    :class:`CompiledQueryModel` where its programs run here (and ``compiled``), else a
    query-only ``SearchModel`` (whose programs are then exported again for the index's
    ``feature_shapes`` and saved, where the index can be written). None without a usable
    file: the caller loads the model's source."""
    path = path_in(index_dir)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
                return None
            flat = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError):
        return None
    params = _nested(flat, json.loads(meta["shapes"]), json.loads(meta["dtypes"]))
    params = jax.device_put(params, jax.local_devices()[0])
    programs = _programs(flat, meta) if compiled else None
    if programs is not None:
        return CompiledQueryModel(meta, params, *programs)
    model = _search_model(meta, params)
    if compiled and not model.clip_only:
        try:
            save(model, index_dir, feature_shapes)  # programs for this JAX, for the next process
        except OSError:
            pass  # a read-only index: every process traces instead
    return model


def _search_model(meta: Dict[str, str], params) -> SearchModel:
    """The query-only SearchModel over saved parameters (loads Flax)."""
    import ml_collections  # noqa: PLC0415 -- with Flax: not on the compiled path

    from ucofia_jax.models.model import Model  # noqa: PLC0415
    from ucofia_jax.search.source import ModelSource, SearchModel  # noqa: PLC0415

    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    model = Model.from_config(
        config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
    )
    return SearchModel(
        source=ModelSource.from_dict(json.loads(meta["source"])),
        config=config,
        model=model,
        params=params,
        fingerprint=meta["fingerprint"],
        description=json.loads(meta["description"]),
        step=json.loads(meta["step"]),
        query_only=True,
    )
