"""tf.data input for training and evaluation, read from the TFDS datasets of `builder.py`.

The order of every stream is planned in numpy from ``(seed, epoch)`` before tf.data sees it,
and records are fetched by index from the ArrayRecord files. That is what makes the order
deterministic and resumable: a run restarted at step ``s`` of an epoch builds the same plan
and starts at row ``s * global_batch`` (no batches are read and thrown away). Each process
reads the columns of that plan its devices hold under the mesh's batch sharding
(``distributed.process_rows``; ``mesh=`` below), so the global batch the processes assemble
is exactly the one a single process would read, for any mesh: with ``mesh.model`` spanning
processes, the processes that hold the same rows read the same rows.

    data = VideoTextData(config.data, split="train", mesh=mesh)  # captions, tokenised once
    for batch in data.train_batches(epoch=0, seed=0, global_batch=128, start_step=0): ...
    train = data.train_epochs(seed=0, global_batch=128)    # what the train loop consumes
    videos = data.eval_video_batches(global_batch=64)       # every video once, padded
    texts = data.eval_text_batches(global_batch=64)         # every caption once, padded

Batches are dicts of numpy arrays (b = this process's rows of the global batch: all of them
in one process, global_batch // process_count when the batch is split over every device):
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
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from data_pipeline import builder as builder_lib
from data_pipeline import tables as tables_lib
from data_pipeline.sampling import FrameSampling
from ucofia_jax.errors import DataError
from ucofia_jax.models import tokenizer
from ucofia_jax.runtime import distributed, sharding


def _hide_accelerators_from_tensorflow() -> None:
    """tf.data runs on the CPU; hiding the GPUs keeps TensorFlow from taking memory JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialised (devices can only be hidden before first use)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
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
    """Numpy generator for one (seed, epoch, stream); PCG64 + SeedSequence are stable across
    numpy versions."""
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


def plan_columns(plan: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The columns ``rows`` (a process's rows of each global batch, ``distributed.process_rows``
    order) of every step of `plan` [steps, global_batch]."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= plan.shape[1]:
        raise ValueError(
            f"rows {rows.tolist()} are not columns of a global batch of {plan.shape[1]}"
        )
    return plan[:, rows]


def block_rows(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Rows ``[p * b, (p + 1) * b)`` of a global batch (b = global_batch / process_count): the
    rows process p holds when the batch is split over every device of a mesh that lists each
    process's devices together (``mesh.data=-1``). Not the rule for other meshes: with
    ``mesh.model`` spanning processes the processes hold the same rows (``process_rows``)."""
    b = local_batch_size(global_batch, process_count)
    return np.arange(process_index * b, (process_index + 1) * b)


def shard_plan(plan: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process p's :func:`block_rows` of every global batch (simulated processes in tests and
    benchmarks; a run reads the mesh's rows, ``VideoTextData(..., mesh=mesh)``)."""
    return plan_columns(plan, block_rows(plan.shape[1], process_index, process_count))


# ---------------------------------------------------------------------------------------


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


def _builder(data_cfg, data_dir: str) -> builder_lib.UcofiaVideoText:
    """The reader of `data_cfg`'s dataset and frame sampling in `data_dir`."""
    return builder_lib.get_builder(
        data_cfg.dataset, data_dir=data_dir, sampling=FrameSampling.from_config(data_cfg)
    )


def dataset_problems(data_cfg, split: str | None = None) -> str:
    """'' when ``config.data``'s dataset is built with the splits a run reads (`split`, or the
    train and eval splits); else what is missing and the command that builds it."""
    return _problems(data_cfg, data_cfg.data_dir, split)


def _problems(data_cfg, data_dir: str, split: str | None) -> str:
    try:
        b = _builder(data_cfg, data_dir)
    except ValueError as e:  # unknown dataset
        return str(e)
    c = b.builder_config
    if not b.is_prepared():
        return _not_built(data_cfg, data_dir, b)
    built = list(b.info.splits)
    for s in [split] if split else [data_cfg.train_split, data_cfg.eval_split]:
        try:
            resolve_split(s, built, c.name)
        except DataError as e:
            return str(e)
    return ""


def _not_built(data_cfg, data_dir: str, b: builder_lib.UcofiaVideoText) -> str:
    c = b.builder_config
    manual_dir = data_cfg.manual_dir
    # Whether the raw files are there decides the next step: fetch them, or only build.
    if not manual_dir:
        raw = (
            "Raw files first: config.data.manual_dir is not set; it must name a folder laid "
            f"out as\n{builder_lib.layout_text(c.dataset)}"
        )
    else:
        try:
            builder_lib.check_manual_dir(c.dataset, manual_dir)
            raw = f"The raw files in config.data.manual_dir = {manual_dir!r} look complete."
        except DataError as e:
            raw = f"Raw files first (config.data.manual_dir): {e}"
    cmd = (
        f"python -m data_pipeline.build --dataset={c.dataset} --manual_dir={manual_dir or 'RAW'} "
        f"--data_dir={data_dir} {c.sampling.build_flags()}"
    )
    return (
        f"the {c.dataset} dataset ({c.name}) is not built in config.data.data_dir = "
        f"{data_dir!r} (expected {b.data_dir}).\n{raw}\nThen build it with:\n  {cmd}"
    )


class VideoTextData:
    """One split of a built dataset: tables of ids/captions, tokens, and batch streams.

    Args:
      data_cfg: the ``config.data`` section; reads ``dataset, data_dir, max_words,
        expand_sentences, prefetch, num_parallel_calls``, the frame sampling (`FrameSampling`'s
        keys; ``self.sampling``) and ``manual_dir`` for the message when it is not built.
      split: ``train`` / ``val`` / ``test``.
      data_dir: overrides ``data_cfg.data_dir``.
      mesh: the run's mesh; each process reads the rows its devices hold under the batch
        sharding (``distributed.process_rows``). Required with several processes.
      process_index, process_count: default to jax's; without a mesh, tests pass them to
        simulate processes that hold :func:`block_rows`. With a mesh, ``process_index`` picks
        whose rows to read (default: this process's).
    """

    def __init__(
        self,
        data_cfg,
        *,
        split: str,
        data_dir: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        mesh: Mesh | None = None,
    ):
        _hide_accelerators_from_tensorflow()
        self.data_cfg = data_cfg
        self.split = split
        self.process_index, self.process_count = _process(process_index, process_count)
        if mesh is None and jax.process_count() > 1:
            # Which rows a process holds depends on the mesh, not on its index alone.
            raise ValueError("VideoTextData needs the mesh (mesh=) in a multi-process run")
        self.mesh = mesh
        data_dir = data_dir or data_cfg.data_dir
        if not data_cfg.dataset or not data_dir:
            raise ValueError(
                "config.data.dataset and a data_dir (config.data.data_dir) are required"
            )
        self.max_words = int(data_cfg.max_words)
        self.expand_sentences = bool(data_cfg.expand_sentences)
        self.builder = _builder(data_cfg, data_dir)
        name = self.builder.builder_config.name
        if not self.builder.is_prepared():
            raise DataError(_not_built(data_cfg, data_dir, self.builder))
        split = resolve_split(split, list(self.builder.info.splits), name)
        self.split = split
        self.sampling = self.builder.builder_config.sampling
        self._source = self.builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        tables = tables_lib.load_tables(self._source, self.builder.data_dir, split)
        self.video_ids = tables.video_ids
        self.texts = tables.texts
        self.text_offsets = tables.text_offsets
        self.text_to_video = np.repeat(
            np.arange(len(self.video_ids)), np.diff(self.text_offsets)
        ).astype(np.int32)
        # All captions tokenised once (cached BPE: ~200k captions in seconds); batches index in.
        self.input_ids, self.input_mask = tokenizer.tokenize(self.texts, self.max_words)

    def rows(self, global_batch: int) -> np.ndarray:
        """The rows of every global batch of `global_batch` this process reads."""
        if self.mesh is None:
            return block_rows(global_batch, self.process_index, self.process_count)
        return distributed.process_rows(
            global_batch, sharding.batch_sharding(self.mesh, 1), self.process_index
        )

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
        self, *, epoch: int, seed: int, global_batch: int, start_step: int = 0
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
        rows = self.rows(global_batch)
        vplan = plan_columns(vplan, rows)[start_step:]
        tplan = plan_columns(tplan, rows)[start_step:]
        for batch in self._video_stream(vplan, {"text_index": tplan}):
            yield self._add_text(batch)

    def train_epochs(self, *, seed: int, global_batch: int) -> TrainEpochs:
        """The training stream as the train loop takes it."""
        return TrainEpochs(
            data=self,
            seed=seed,
            global_batch=global_batch,
            steps_per_epoch=self.steps_per_epoch(global_batch),
        )

    # --- evaluation ---

    def eval_video_batches(
        self, *, global_batch: int, limit: int | None = None, seed: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every video of the split exactly once (or `limit` of them, seeded), last batch padded."""
        order = self._subset(self.num_videos, limit, seed)
        index, valid = eval_plan(len(order), global_batch)
        rows = self.rows(global_batch)
        yield from self._video_stream(
            plan_columns(order[index], rows), {"valid": plan_columns(valid, rows)}
        )

    def eval_text_batches(
        self, *, global_batch: int, limit: int | None = None, seed: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every text of the split exactly once (or `limit`, seeded), with its video; padded."""
        order = self._subset(self.num_texts, limit, seed)
        index, valid = eval_plan(len(order), global_batch)
        rows = self.rows(global_batch)
        index = plan_columns(order[index], rows)
        valid = plan_columns(valid, rows)
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
        self, video_plan: np.ndarray, extra: dict[str, np.ndarray]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fetches and decodes the records of `video_plan` [steps, b] in order, batched by row."""
        steps, b = video_plan.shape
        if steps == 0:
            return
        source = self._source
        f, s = self.sampling.max_frames, self.sampling.image_size
        # The stored tf.Example read directly: the frames' JPEG bytes as they are, the mask
        # (TFDS stores int32 as int64). TFDS's own deserialize_example with a SkipDecoding
        # decoder would read the same, through deprecated TensorFlow and TFDS calls that warn.
        record_spec = {
            "frames": tf.io.FixedLenFeature([f], tf.string),
            "frame_mask": tf.io.FixedLenFeature([f], tf.int64),
        }

        def fetch(i):
            return source[int(i)]

        def load(item):
            raw = tf.numpy_function(fetch, [item["video_index"]], tf.string, stateful=False)
            ex = tf.io.parse_single_example(tf.reshape(raw, []), record_spec)
            jpegs = ex["frames"]
            # Accurate IDCT (TF's default is the fast one): the frames then match what PIL decodes
            # from the same files, i.e. the builder's JPEG of decode_clip's output, not a
            # slightly different image per library.
            frames = [
                tf.io.decode_jpeg(jpegs[i], channels=3, dct_method="INTEGER_ACCURATE")
                for i in range(f)
            ]
            item["frames"] = tf.ensure_shape(tf.stack(frames), (f, s, s, 3))
            item["frame_mask"] = tf.cast(ex["frame_mask"], tf.int32)
            return item

        flat = {"video_index": video_plan.reshape(-1).astype(np.int32)}
        flat.update({k: v.reshape(-1).astype(np.int32) for k, v in extra.items()})
        ds = tf.data.Dataset.from_tensor_slices(flat)
        # deterministic=True keeps the planned order even with parallel decoding.
        ds = ds.map(load, num_parallel_calls=self.data_cfg.num_parallel_calls, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.prefetch(self.data_cfg.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = max(os.cpu_count() or 1, 2)
        ds = ds.with_options(options)
        yield from ds.as_numpy_iterator()


@dataclasses.dataclass(frozen=True)
class TrainEpochs:
    """`training.loop.TrainData` over a `VideoTextData`: a fixed step count per epoch and each
    epoch's batches, from a given step on when a run resumes (the order is seeded per epoch)."""

    data: VideoTextData
    seed: int
    global_batch: int
    steps_per_epoch: int

    @property
    def video_ids(self) -> list:
        """The split's video ids: a batch's ``video_index`` row ``i`` is ``video_ids[i]``."""
        return self.data.video_ids

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        return self.data.train_batches(
            epoch=epoch,
            seed=self.seed,
            global_batch=self.global_batch,
            start_step=start_step,
        )
