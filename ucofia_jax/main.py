r"""Train and evaluate UCoFiA: the program users run.

  python -m ucofia_jax.main --config=configs/msrvtt.py --workdir=DIR [--mode=train_and_eval]
  python -m ucofia_jax.main --config=configs/demo.py --workdir=workdir/demo        # CPU demo
  python -m ucofia_jax.main --config=configs/msrvtt.py --workdir=DIR --mode=eval \
      [--config.model.ucofia_checkpoint=pytorch_model.bin]   # the released checkpoint

Any config value can be overridden on the command line (``--config.train.batch_size=64``).
The config is validated and the inputs are checked before anything is compiled. Re-running
with the same ``--workdir`` resumes from the last readable checkpoint (params, optimizer,
step, PRNG, data position), after checking, before any dataset is built, that it was
written by the same model, optimizer, data and run settings
(``config.train.allow_resume_with_changes`` lets the settings that leave the state's tree
alike differ; other changes, such as ``train.lr``, are said on one line).

The terminal shows our own lines (progress bar, summaries, results) and real warnings and
errors; the libraries' log lines (TFDS, absl, Orbax, TensorFlow, jax) are hidden unless
``--verbose`` or ``UCOFIA_VERBOSE=1``. A known problem (bad config key or value, missing or bad
data, unreadable checkpoint, full or read-only disk, non-finite loss) prints one line and a
hint on stderr and exits with status 2 (``--verbose`` adds the traceback); SIGTERM saves and
exits 0, Ctrl-C saves and exits 130, a second Ctrl-C exits at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_flags

from data_pipeline import build as build_lib
from data_pipeline import pipeline, synthetic
from data_pipeline.sampling import FrameSampling
from ucofia_jax import config as config_lib
from ucofia_jax import errors, preflight, weights
from ucofia_jax.evaluation import evaluator, report
from ucofia_jax.models.model import Model
from ucofia_jax.runtime import cli, distributed, sharding
from ucofia_jax.training import checkpoints, loop, optim, resume, trainer
from ucofia_jax.training.metric_writer import MetricWriter

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.json, report.")
flags.DEFINE_enum(
    "mode",
    "train_and_eval",
    list(preflight.MODES),
    "train: train only; eval: evaluate the workdir's (or the released) "
    "checkpoint; train_and_eval: both.",
)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool(
    "verbose",
    False,
    "Print the libraries' log lines and the traceback of known errors too "
    f"(or {cli.VERBOSE_ENV}=1).",
)

# One line and status 2 at the command line (runtime/cli.py); anything else is a traceback.
KNOWN_ERRORS = (
    errors.UserError,  # config, checkpoint, data, non-finite loss: ucofia_jax/errors.py
    FileNotFoundError,  # a missing dataset, checkpoint or weights file (preflight.check_inputs)
)


def run(config, workdir: str, mode: str, progress: bool = True) -> Dict[str, Any]:
    """The whole program (importable for tests): check, build, train, evaluate, report.

    Returns the evaluation metrics ({} for --mode=train; {'preempted', 'step', 'signal'} when
    a signal stopped training)."""
    train, evaluate = preflight.MODES[mode]
    distributed.maybe_initialize(config)  # before anything touches jax.devices()
    if distributed.process_count() > 1:
        # Process 0 keeps the level main() chose, the others log warnings only, prefixed.
        distributed.setup_logging(logging.getLogger().getEffectiveLevel())
    preflight.resolve_paths(config, workdir)
    preflight.check_config(config)
    preflight.check_inputs(config, mode, workdir)

    out = _RunOutput(workdir)
    try:
        model = Model.from_config(
            config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
        )
        if train:  # before any dataset is built or anything compiled
            _check_resume(config, workdir, model, out)
        if config.data.synthetic.enabled:
            _prepare_synthetic_data(config, out)
        mesh = _make_mesh(config, out)
        splits = _Splits.open(config, mesh, train=train, evaluate=evaluate)
        # Built once per run, and only when something is evaluated: choosing the level-3
        # kernel may compile it.
        fns = None if splits.test is None else evaluator.retrieval_fns(model, mesh, config.eval)
        if train:
            params, step, stopped_by = _train(
                config, workdir, model, mesh, fns, splits, out, progress
            )
            if stopped_by:
                return {"preempted": True, "step": step, "signal": stopped_by}
        else:
            params, step = _params_to_evaluate(config, workdir, out)
            out.write_config(config)
        if not evaluate:
            return {}
        return _evaluate_and_report(config, workdir, fns, mesh, params, step, splits, out)
    finally:
        out.close()


# --------------------------------------------------------------------------- the steps


class _RunOutput:
    """log.txt + TensorBoard + stdout, written by process 0 only."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.t_start = time.time()
        self.main = distributed.is_main_process()
        os.makedirs(workdir, exist_ok=True)
        self.writer = MetricWriter(workdir, enabled=self.main)

    def say(self, msg: str) -> None:
        if self.main:
            self.writer.text(msg)
            print(msg, flush=True)

    def write_config(self, config) -> None:
        if self.main:
            with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=2))

    def close(self) -> None:
        self.say(f"total wall time {time.time() - self.t_start:.0f} s")
        self.writer.close()


def _state_shapes(config, model) -> Dict[str, tuple]:
    """``{path: shape}`` of the train state this config makes (params, optimizer state,
    step, PRNG key), traced only (nothing is allocated or compiled). The optimizer's tree
    does not depend on the schedule's length, so any length serves."""

    def build():
        state = trainer.create_train_state(model, config.seed)
        tx = optim.make_optimizer(config.train, optim.group_schedules(config.train, 1000))
        return {**state, "opt_state": tx.init(state["params"])}

    return resume.tree_shapes(jax.eval_shape(build))


def _check_resume(config, workdir: str, model, out: _RunOutput) -> None:
    """If ``workdir`` has a checkpoint, may this config continue it (resume.check_resume on
    its metadata and the state's tree)? Refused: one line naming the keys; allowed changes
    are said on one line."""
    found = checkpoints.newest_saved(workdir)
    if found is None:
        return
    step, meta, saved_shapes = found
    resume.check_resume(
        resume.config_dict(config),
        workdir,
        step,
        meta,
        saved_shapes,
        _state_shapes(config, model),
        allow_changes=config.train.allow_resume_with_changes,
        announce=out.say,
    )


def _prepare_synthetic_data(config, out: _RunOutput) -> None:
    """Demo: make the synthetic clips (MSR-VTT layout) and build the TFDS dataset if absent."""
    if out.main:
        tfds.disable_progress_bar()
        s, raw = config.data.synthetic, config.data.manual_dir
        if not os.path.exists(os.path.join(raw, "MSRVTT_data.json")):
            t0 = time.time()
            synthetic.make_synthetic_dataset(
                raw,
                num_train=s.num_train,
                num_test=s.num_test,
                frame_size=s.frame_size,
                num_seconds=s.num_seconds,
                fps=s.fps,
                seed=s.seed,
                captions_per_video=s.captions_per_video,
            )
            out.say(
                f"synthetic dataset: {s.num_train} train + {s.num_test} test clips in {raw} "
                f"({time.time() - t0:.0f} s)"
            )
        d = config.data
        build_lib.build(
            d.dataset,
            manual_dir=raw,
            data_dir=d.data_dir,
            sampling=FrameSampling.from_config(d),
            progress=False,
            log=out.say,
        )
    distributed.sync("synthetic_data")


def _make_mesh(config, out: _RunOutput):
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.batch_size_multiple(mesh)
    for section, accumulate in (("train", config.train.accumulate_steps), ("eval", 1)):
        bad = config_lib.batch_split_error(section, config[section].batch_size, shards, accumulate)
        if bad:
            raise errors.ConfigError(bad)
    out.say(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"devices; global batch {config.train.batch_size}"
    )
    return mesh


class _Splits:
    """The dataset splits a run reads: training (also the SK-norm banks) and evaluation."""

    def __init__(self, train_data, test_data):
        self.train, self.test = train_data, test_data

    @classmethod
    def open(cls, config, mesh, *, train: bool, evaluate: bool) -> _Splits:
        d = config.data
        need_train = train or config.eval.sk_norm
        need_test = evaluate or (train and config.train.eval_every_epochs > 0)
        # Each process reads the rows its devices hold under the mesh's batch sharding.
        return cls(
            pipeline.VideoTextData(d, split=d.train_split, mesh=mesh) if need_train else None,
            pipeline.VideoTextData(d, split=d.eval_split, mesh=mesh) if need_test else None,
        )


def _train(config, workdir, model, mesh, fns, splits, out, progress):
    """Train from scratch or from the last readable checkpoint; (params, step, stopped_by):
    ``stopped_by`` names the signal that stopped the run (its state is saved), else None."""
    tc = config.train
    spe = splits.train.steps_per_epoch(tc.batch_size)
    total = trainer.total_train_steps(tc, spe)
    state = trainer.create_train_state(model, config.seed)
    resume.check_frozen(tc.frozen, state["params"])
    run_trainer = trainer.make_trainer(
        model,
        tc,
        mesh,
        state,
        trainer.schedule_steps(tc, spe),
        axis_rules=config.mesh.logical_axis_rules,
    )
    ckpt = checkpoints.Checkpointer(workdir, keep=tc.keep_checkpoints)
    guard = None
    try:
        saved_config = resume.config_dict(config)
        # Again on the checkpoint restored (an earlier one when the newest is damaged), on
        # its params; the changes it allows were said by _check_resume.
        check = functools.partial(
            resume.check_resume,
            saved_config,
            workdir,
            shapes=resume.tree_shapes(state["params"]),
            allow_changes=tc.allow_resume_with_changes,
        )
        state = trainer.place_state(run_trainer, state)
        restored = ckpt.restore_latest(state, check=check)
        start_step = None
        if restored is not None:
            state, meta = restored
            start_step = int(meta["step"])
            out.say(
                f"resumed from step {start_step} (epoch {meta['epoch']}, step "
                f"{meta['step_in_epoch']} of it) in {workdir}/checkpoints"
            )
        ckpt.check_room(state)
        out.write_config(config)  # only now: a refused resume leaves the old one in place
        guard = checkpoints.PreemptionGuard()
        t0 = time.time()
        state = loop.train_loop(
            run_trainer,
            state,
            splits.train.train_epochs(seed=config.seed, global_batch=tc.batch_size),
            total_steps=total,
            checkpointer=ckpt,
            guard=guard,
            writer=out.writer,
            validation=_validation(config, fns, mesh, splits.test, out),
            progress=progress and out.main,
            meta_extra={"experiment": config.experiment, "config": saved_config},
            start_step=start_step,
        )
    finally:
        if guard is not None:
            guard.restore()
        ckpt.close()
    step = int(jax.device_get(state["step"]))
    out.say(f"trained to step {step}/{total} in {time.time() - t0:.0f} s")
    return state["params"], step, guard.signal_name


def _validation(config, fns, mesh, test_data, out) -> Optional[loop.Validation]:
    """The epoch-end validation of a run (``train.eval_every_epochs``), if it has one."""
    if not config.train.eval_every_epochs or test_data is None:
        return None
    evaluate = functools.partial(_validation_t2v, fns, mesh, config, test_data)
    return loop.Validation(config.train.eval_every_epochs, evaluate, out.writer, out.say)


def _validation_t2v(fns, mesh, config, test_data, params, step: int) -> Dict[str, float]:
    """Text-to-video metrics of ``params`` on the evaluation split, without SK-norm."""
    return evaluator.evaluate(
        fns,
        params,
        mesh,
        config.eval,
        test_data,
        rng=jax.random.PRNGKey(config.seed + 1),
        step=step,
        sk_norm=False,
    ).metrics["t2v"]


def _params_to_evaluate(config, workdir, out):
    """(params, step) of --mode=eval: the released UCoFiA weights or the workdir's checkpoint."""
    released = bool(config.model.ucofia_checkpoint)
    loaded = weights.load(config, workdir=None if released else workdir)
    if not released:
        out.say(f"evaluating the checkpoint of step {loaded.step} from {workdir}")
    return loaded.params, loaded.step


def _evaluate_and_report(config, workdir, fns, mesh, params, step, splits, out):
    ev = evaluator.evaluate(
        fns,
        params,
        mesh,
        config.eval,
        splits.test,
        rng=jax.random.PRNGKey(config.seed + 1),
        step=step,
        train_data=splits.train,
        bank_seed=config.seed,
    )
    res = ev.metrics
    path = evaluator.write_results(workdir, res, out.writer)
    if out.main:
        with open(os.path.join(workdir, "results.md"), encoding="utf-8") as fh:
            out.say(f"wrote {path} ({res['seconds']} s):\n" + fh.read())
    if config.eval.write_report:
        test = splits.test
        # Every process: each holds its rows of the test videos; the drawn frames are gathered.
        frames = report.drawn_frame_strips(
            ev.similarity,
            test.text_to_video,
            test.eval_video_batches(global_batch=config.eval.batch_size),
        )
        if out.main:
            html_path = report.write_report(
                workdir,
                res,
                ev.similarity,
                test.text_to_video,
                test.texts,
                frames,
                test.video_ids,
                title=f"UCoFiA {config.experiment}",
            )
            out.say(f"report: {html_path}")
    return res


def main(argv) -> int:
    if len(argv) > 1:
        raise errors.ConfigError(
            f"unexpected arguments {argv[1:]}: flags are --name=value, config values "
            "--config.section.key=value"
        )
    if FLAGS.workdir is None:
        raise errors.ConfigError("--workdir is required (checkpoints, logs and results go there)")
    # Our own lines (progress, summaries, results) and real warnings; --verbose adds the
    # libraries' log lines (argv: the flags are parsed; this reads UCOFIA_VERBOSE).
    distributed.quiet_logs(FLAGS.verbose or cli.verbose_requested(argv))
    res = run(FLAGS.config, FLAGS.workdir, FLAGS.mode, progress=FLAGS.progress)
    if res.get("signal") == "SIGINT":
        return cli.INTERRUPTED  # saved; 130 tells a calling script the run did not finish
    return 0


def _parse_flags(argv):
    """absl's parsing, with a bad flag, an unknown ``--config.*`` key or a config file that
    does not load raised as a :class:`ConfigError` (one line at the command line)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise errors.ConfigError(str(e)) from e
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no key
        raise errors.ConfigError(_unknown_override(argv, e)) from e
    try:
        FLAGS.config.keys()  # a file that failed to load raises on first use
    except Exception as e:  # pylint: disable=broad-except
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
        raise errors.ConfigError(
            f"--config={path} does not load: {str(e).strip().splitlines()[-1].strip()}"
        ) from e
    return rest


def _unknown_override(argv, error) -> str:
    """Name the ``--config.a.b=...`` override whose key is not in the schema."""
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if not _known_key(key):
                return config_lib.unknown_key_message(key)
    return f"a --config.* override names no key ({error})"


def _known_key(key: str) -> bool:
    node = config_lib.base_config()
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _hint(e: BaseException) -> Optional[str]:
    if isinstance(e, errors.ConfigError) and "unknown key" in str(e):
        return "every key and its default: ucofia_jax/config.py base_config()"
    return None


def cli_main(argv=None) -> None:
    """The command line, behind the error boundary (runtime/cli.py)."""
    argv = list(sys.argv if argv is None else argv)
    flags.mark_flags_as_required(["config"])
    status = cli.guarded(
        lambda: app.run(main, argv=argv, flags_parser=_parse_flags),
        known=KNOWN_ERRORS,
        verbose=cli.verbose_requested(argv),
        hint=_hint,
    )
    sys.exit(status)


if __name__ == "__main__":
    cli_main()
