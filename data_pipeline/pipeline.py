"""tf.data input for training and evaluation, read from the TFDS datasets of `builder.py`.

The order of every stream is planned in numpy from ``(seed, epoch)`` before tf.data sees it,
and records are fetched by index from the ArrayRecord files. That is what makes the order
deterministic and resumable: a run restarted at step ``s`` of an epoch builds the same plan
and starts at row ``s * global_batch`` (no batches are read and thrown away), and
per-process sharding is a column slice of the same plan, so the processes together see
exactly the global batch a single process would see.

    data = VideoTextData(config, split="train")            # reads captions, tokenises once
    for batch in data.train_batches(epoch=0, seed=0, global_batch=128, start_step=0): ...
    videos = data.eval_video_batches(global_batch=64)       # every video once, padded
    texts = data.eval_text_batches(global_batch=64)         # every caption once, padded

Batches are dicts of numpy arrays (b = global_batch // process_count):
  train:       input_ids, input_mask int32 [b, max_words]; frames uint8 [b, F, S, S, 3];
               frame_mask int32 [b, F]; video_index, text_index int32 [b]
  eval video:  frames, frame_mask, video_index, valid (int32 [b], 0 on padding rows)
  eval text:   input_ids, input_mask, text_index, video_index (its ground-truth video), valid

Indices refer to this split's tables: ``data.video_ids[video_index]``,
``data.texts[text_index]``, ``data.text_to_video[text_index]``. MSVD/VATEX test texts are all
captions (every caption a query, several per video); ActivityNet/DiDeMo texts are the
paragraphs the readers built; MSR-VTT 1k-A has one text per video.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from data_pipeline.records import DataError


def _cfg(config, dotted: str, default=None):
    """`config.a.b` or `default` when absent (ConfigDict, dict or any attribute object)."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, dict) or (hasattr(node, "keys") and hasattr(node, "get")):
            node = node.get(part, None)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def _tensorflow():
    """TensorFlow for tf.data only: hide accelerators so it never takes memory JAX needs."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialised (devices can only be hidden before first use)
    return tf


def config_with_data_dir(config, data_dir: str):
    """A copy of `config` whose data.data_dir is `data_dir` (for the messages)."""
    try:
        c = config.copy_and_resolve_references()
        c.data.data_dir = data_dir
        return c
    except AttributeError:  # a plain dict
        import copy  # pylint: disable=g-import-not-at-top

        c = copy.deepcopy(config)
        c["data"]["data_dir"] = data_dir
        return c


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {process_count} processes"
        )
    return global_batch // process_count


def rng_for(seed: int, epoch: int, stream: str = "train") -> np.random.Generator:
    """Numpy generator for one (seed, epoch, stream); PCG64 + SeedSequence is stable across versions."""
    tag = sum(ord(c) * 31**i for i, c in enumerate(stream)) % (2**31)
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), tag]))
    )


# ---------------------------------------------------------------------------------------
# Plans: which (video, text) goes into which row. Pure numpy, so they are easy to test.


def train_plan(
    text_offsets: np.ndarray, *, seed: int, epoch: int, global_batch: int, expand_sentences: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(video_index, text_index)`` int32 [steps, global_batch] for one training epoch.

    One random caption per video (new draw each epoch), or every (caption, video) pair when
    `expand_sentences`; the tail that does not fill a global batch is dropped (drop_remainder).
    `text_offsets` [V + 1]: the texts of video v are ``text_offsets[v]:text_offsets[v + 1]``.
    """
    rng = rng_for(seed, epoch)
    num_videos = len(text_offsets) - 1
    counts = np.diff(text_offsets)
    if expand_sentences:
        text_index = rng.permutation(int(text_offsets[-1]))
        video_index = np.searchsorted(text_offsets, text_index, side="right") - 1
    else:
        video_index = rng.permutation(num_videos)
        text_index = text_offsets[video_index] + rng.integers(0, counts[video_index])
    steps = len(video_index) // global_batch
    if steps == 0:
        raise DataError(
            f"the training split has {len(video_index)} samples, fewer than one "
            f"global batch of {global_batch}"
        )
    n = steps * global_batch
    return (
        video_index[:n].reshape(steps, global_batch).astype(np.int32),
        text_index[:n].reshape(steps, global_batch).astype(np.int32),
    )


def eval_plan(num_items: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, valid)`` int32 [steps, global_batch]: every item once, in order, last batch padded.

    Padding rows repeat item 0 (a real record, so no special case downstream) with valid = 0.
    """
    steps = max(-(-num_items // global_batch), 1)
    index = np.zeros(steps * global_batch, np.int32)
    valid = np.zeros(steps * global_batch, np.int32)
    index[:num_items] = np.arange(num_items)
    valid[:num_items] = 1
    return index.reshape(steps, global_batch), valid.reshape(steps, global_batch)


def shard_plan(plan: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process p's rows of every global batch: columns ``[p * b, (p + 1) * b)``."""
    b = local_batch_size(plan.shape[1], process_count)
    return plan[:, process_index * b : (process_index + 1) * b]


# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Tables:
    video_ids: list[str]
    texts: list[str]
    text_offsets: np.ndarray  # [V + 1]


def tables_path(version_dir: str, split: str) -> str:
    return os.path.join(os.fspath(version_dir), f"ucofia-tables-{split}.json")


def load_tables(source, version_dir: str, split: str, *, write: bool = True) -> _Tables:
    """The split's ids and captions from its sidecar JSON, or by reading the records (then saved).

    Reading the records means reading every frame byte (ArrayRecord reads whole records):
    minutes for ActivityNet's 64-frame clips. The build writes the sidecar once; a dataset
    built otherwise gets it on first use (when its directory is writable).
    """
    path = tables_path(version_dir, split)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("num_records") == len(source):
                caps = d["captions"]
                return _Tables(
                    list(d["video_ids"]),
                    [c for cs in caps for c in cs],
                    np.cumsum([0] + [len(cs) for cs in caps]).astype(np.int64),
                )
        except (OSError, ValueError, KeyError):
            pass  # stale or damaged: rebuilt below
    tables = _read_tables(source)
    if write:
        caps = [
            tables.texts[tables.text_offsets[i] : tables.text_offsets[i + 1]]
            for i in range(len(tables.video_ids))
        ]
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(
                    {"num_records": len(source), "video_ids": tables.video_ids, "captions": caps},
                    f,
                    ensure_ascii=False,
                )
            os.replace(tmp, path)
        except OSError:
            pass  # read-only data_dir: fine, only slower next time
    return tables


def _read_tables(source) -> _Tables:
    """Video ids and captions of every record, without decoding frames."""
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top

    video_ids, texts, offsets = [], [], [0]
    n = len(source)
    step = 256
    for lo in range(0, n, step):
        raws = source.__getitems__(list(range(lo, min(lo + step, n))))
        for raw in raws:
            feats = example_pb2.Example.FromString(raw).features.feature
            video_ids.append(feats["video_id"].bytes_list.value[0].decode("utf-8"))
            caps = [c.decode("utf-8") for c in feats["captions"].bytes_list.value]
            texts.extend(caps)
            offsets.append(offsets[-1] + len(caps))
    return _Tables(video_ids, texts, np.asarray(offsets, np.int64))


def resolve_split(split: str, built: list[str], name: str = "") -> str:
    """`split`, or ``test`` for ``val``/``val_1`` where the dataset has no separate val split.

    The original evaluates MSR-VTT, VATEX and ActivityNet (``val_1``) on the same files for
    validation and test; the builder stores them once, as ``test``.
    """
    if split in built:
        return split
    if split in ("val", "val_1") and "val" not in built and "test" in built:
        return "test"
    raise DataError(f"{name} has no split {split!r}; it has {sorted(built)}")


def dataset_problems(config, split: str | None = None) -> str:
    """'' when `config`'s dataset is built (with its splits); else what is missing and how to build it."""
    from data_pipeline import builder as builder_lib  # pylint: disable=g-import-not-at-top

    dataset = _cfg(config, "data.dataset")
    data_dir = _cfg(config, "data.data_dir")
    try:
        b = builder_lib.get_builder(
            dataset,
            data_dir=data_dir,
            max_frames=_cfg(config, "data.max_frames"),
            image_size=int(_cfg(config, "data.image_size", 224)),
            feature_framerate=int(_cfg(config, "data.feature_framerate", 1)),
            slice_framepos=int(_cfg(config, "data.slice_framepos", 2)),
        )
    except ValueError as e:
        return str(e)
    c = b.builder_config
    if not b.is_prepared():
        manual = _cfg(config, "data.manual_dir") or "RAW"
        return (
            f"{c.name} is not built in {data_dir} (expected {b.data_dir}). Build it with:\n"
            f"  python -m data_pipeline.build --dataset={dataset} --manual_dir={manual} "
            f"--data_dir={data_dir} --max_frames={c.max_frames} --image_size={c.image_size}"
            + (f" --feature_framerate={c.feature_framerate}" if c.feature_framerate != 1 else "")
            + (f" --slice_framepos={c.slice_framepos}" if c.slice_framepos != 2 else "")
        )
    built = list(b.info.splits)
    wanted = (
        [split]
        if split
        else [_cfg(config, "data.train_split", "train"), _cfg(config, "data.eval_split", "test")]
    )
    for s in wanted:
        try:
            resolve_split(s, built, c.name)
        except DataError as e:
            return str(e)
    return ""


class VideoTextData:
    """One split of a built dataset: tables of ids/captions, tokens, and batch streams.

    Args:
      config: the experiment config; reads ``data.{dataset, data_dir, max_words, max_frames,
        image_size, feature_framerate, slice_framepos, expand_sentences}``.
      split: ``train`` / ``val`` / ``test``.
      data_dir: overrides ``config.data.data_dir``.
      process_index, process_count: default to jax's; tests pass them to simulate processes.
    """

    def __init__(
        self,
        config,
        *,
        split: str,
        data_dir: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        from data_pipeline import builder as builder_lib  # pylint: disable=g-import-not-at-top
        from ucofia_jax import tokenizer  # pylint: disable=g-import-not-at-top

        self.config = config
        self.split = split
        self.process_index, self.process_count = _process(process_index, process_count)
        dataset = _cfg(config, "data.dataset")
        data_dir = data_dir or _cfg(config, "data.data_dir")
        if not dataset or not data_dir:
            raise ValueError(
                "config.data.dataset and a data_dir (config.data.data_dir) are required"
            )
        self.max_words = int(_cfg(config, "data.max_words", 32))
        self.expand_sentences = bool(_cfg(config, "data.expand_sentences", False))
        self.builder = builder_lib.get_builder(
            dataset,
            data_dir=data_dir,
            max_frames=_cfg(config, "data.max_frames"),
            image_size=int(_cfg(config, "data.image_size", 224)),
            feature_framerate=int(_cfg(config, "data.feature_framerate", 1)),
            slice_framepos=int(_cfg(config, "data.slice_framepos", 2)),
        )
        name = self.builder.builder_config.name
        if not self.builder.is_prepared():
            raise DataError(dataset_problems(config_with_data_dir(config, data_dir)))
        split = resolve_split(split, list(self.builder.info.splits), name)
        self.split = split
        self.max_frames = self.builder.builder_config.max_frames
        self.image_size = self.builder.builder_config.image_size
        self._source = self.builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        tables = load_tables(self._source, self.builder.data_dir, split)
        self.video_ids = tables.video_ids
        self.texts = tables.texts
        self.text_offsets = tables.text_offsets
        self.text_to_video = np.repeat(
            np.arange(len(self.video_ids)), np.diff(self.text_offsets)
        ).astype(np.int32)
        # All captions tokenised once (cached BPE: ~200k captions in seconds); batches index in.
        self.input_ids, self.input_mask = tokenizer.tokenize(self.texts, self.max_words)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    # --- training ---

    def steps_per_epoch(self, global_batch: int) -> int:
        n = self.num_texts if self.expand_sentences else self.num_videos
        return n // global_batch

    def train_batches(
        self, *, epoch: int, seed: int, global_batch: int, start_step: int = 0, prefetch: int = 2
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of every global batch of `epoch`, from `start_step` on."""
        vplan, tplan = train_plan(
            self.text_offsets,
            seed=seed,
            epoch=epoch,
            global_batch=global_batch,
            expand_sentences=self.expand_sentences,
        )
        if not 0 <= start_step <= len(vplan):
            raise ValueError(f"start_step {start_step} not in [0, {len(vplan)}] (steps per epoch)")
        vplan = shard_plan(vplan, self.process_index, self.process_count)[start_step:]
        tplan = shard_plan(tplan, self.process_index, self.process_count)[start_step:]
        for batch in self._video_stream(vplan, {"text_index": tplan}, prefetch):
            yield self._add_text(batch)

    # --- evaluation ---

    def eval_video_batches(
        self, *, global_batch: int, limit: int | None = None, seed: int = 0, prefetch: int = 2
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every video of the split exactly once (or `limit` of them, seeded), last batch padded."""
        order = self._subset(self.num_videos, limit, seed)
        index, valid = eval_plan(len(order), global_batch)
        index = order[index]
        yield from self._video_stream(
            shard_plan(index, self.process_index, self.process_count),
            {"valid": shard_plan(valid, self.process_index, self.process_count)},
            prefetch,
        )

    def eval_text_batches(
        self, *, global_batch: int, limit: int | None = None, seed: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every text of the split exactly once (or `limit`, seeded), with its video; padded."""
        order = self._subset(self.num_texts, limit, seed)
        index, valid = eval_plan(len(order), global_batch)
        index = shard_plan(order[index], self.process_index, self.process_count)
        valid = shard_plan(valid, self.process_index, self.process_count)
        for t, v in zip(index, valid):
            yield {
                "input_ids": self.input_ids[t],
                "input_mask": self.input_mask[t],
                "text_index": t.astype(np.int32),
                "video_index": self.text_to_video[t],
                "valid": v.astype(np.int32),
            }

    def text_bank(self, size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Up to `size` texts of this split (seeded subset, all if None), e.g. the SK-norm bank."""
        t = self._subset(self.num_texts, size, seed)
        return {
            "input_ids": self.input_ids[t],
            "input_mask": self.input_mask[t],
            "text_index": t.astype(np.int32),
            "video_index": self.text_to_video[t],
        }

    # --- internals ---

    @staticmethod
    def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
        """All of ``range(n)`` for limit None / negative / >= n, else a seeded sorted subset."""
        if limit is None or limit < 0 or limit >= n:
            return np.arange(n, dtype=np.int32)
        return np.sort(rng_for(seed, 0, "subset").choice(n, int(limit), replace=False)).astype(
            np.int32
        )

    def _add_text(self, batch):
        t = batch["text_index"]
        batch["input_ids"] = self.input_ids[t]
        batch["input_mask"] = self.input_mask[t]
        return batch

    def _video_stream(
        self, video_plan: np.ndarray, extra: dict[str, np.ndarray], prefetch: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fetches and decodes the records of `video_plan` [steps, b] in order, batched by row."""
        tf = _tensorflow()

        steps, b = video_plan.shape
        if steps == 0:
            return
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        source = self._source
        features = self.builder.info.features
        decoders = {"frames": tfds.decode.SkipDecoding()}

        def fetch(i):
            return source[int(i)]

        def load(item):
            raw = tf.numpy_function(fetch, [item["video_index"]], tf.string, stateful=False)
            ex = features.deserialize_example(tf.reshape(raw, []), decoders=decoders)
            jpegs = tf.ensure_shape(ex["frames"], (self.max_frames,))
            # Accurate IDCT (TF's default is the fast one): the frames then match what PIL decodes
            # from the same files, i.e. the builder's JPEG of decode_clip's output, not a
            # slightly different image per library.
            frames = [
                tf.io.decode_jpeg(jpegs[i], channels=3, dct_method="INTEGER_ACCURATE")
                for i in range(self.max_frames)
            ]
            item["frames"] = tf.ensure_shape(
                tf.stack(frames), (self.max_frames, self.image_size, self.image_size, 3)
            )
            item["frame_mask"] = tf.ensure_shape(ex["frame_mask"], (self.max_frames,))
            return item

        flat = {"video_index": video_plan.reshape(-1).astype(np.int32)}
        flat.update({k: v.reshape(-1).astype(np.int32) for k, v in extra.items()})
        ds = tf.data.Dataset.from_tensor_slices(flat)
        # deterministic=True keeps the planned order even with parallel decoding.
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(prefetch)
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = max(os.cpu_count() or 1, 2)
        ds = ds.with_options(options)
        yield from ds.as_numpy_iterator()


# ---------------------------------------------------------------------------------------
# Function entry points (what train.py / evaluate.py call).


def train_dataset(
    config,
    *,
    epoch: int,
    start_step: int = 0,
    data_dir: str | None = None,
    data: VideoTextData | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Training batches of one epoch: seed ``config.seed``, global batch ``config.train.batch_size``.

    Pass `data` (a `VideoTextData` of the train split) to avoid re-reading the tables each epoch.
    """
    data = data or VideoTextData(
        config,
        split=_cfg(config, "data.train_split", "train"),
        data_dir=data_dir,
        process_index=process_index,
        process_count=process_count,
    )
    return data.train_batches(
        epoch=epoch,
        seed=int(_cfg(config, "seed", 0)),
        global_batch=int(_cfg(config, "train.batch_size")),
        start_step=start_step,
        prefetch=int(_cfg(config, "data.prefetch", 2)),
    )


def eval_dataset(
    config,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    data: VideoTextData | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, Any]:
    """The evaluation streams of a split, global batch ``config.eval.batch_size``.

    Returns ``{'data': VideoTextData, 'videos': iterator, 'texts': iterator,
    'text_to_video': int32 [T], 'num_videos', 'num_texts'}``.
    """
    split = split or _cfg(config, "data.eval_split", "test")
    data = data or VideoTextData(
        config,
        split=split,
        data_dir=data_dir,
        process_index=process_index,
        process_count=process_count,
    )
    gb = int(_cfg(config, "eval.batch_size", _cfg(config, "train.batch_size")))
    return {
        "data": data,
        "videos": data.eval_video_batches(global_batch=gb),
        "texts": data.eval_text_batches(global_batch=gb),
        "text_to_video": data.text_to_video,
        "num_videos": data.num_videos,
        "num_texts": data.num_texts,
    }


def sk_text_bank(
    config, *, size: int | None = None, data_dir: str | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Training-split texts for the SK-norm query bank (SPEC §8), at most ``size``
    (default ``config.eval.sk_bank_size``; negative = all)."""
    data = VideoTextData(
        config,
        split=_cfg(config, "data.train_split", "train"),
        data_dir=data_dir,
        process_index=0,
        process_count=1,
    )
    size = size if size is not None else _cfg(config, "eval.sk_bank_size", -1)
    return data.text_bank(None if size < 0 else size, seed=seed)
