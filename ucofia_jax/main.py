r"""Train and evaluate UCoFiA: the program users run.

  python -m ucofia_jax.main --config=configs/msrvtt.py --workdir=DIR [--mode=train_and_eval]
  python -m ucofia_jax.main --config=configs/demo.py --workdir=workdir/demo        # CPU demo
  python -m ucofia_jax.main --config=configs/msrvtt.py --workdir=DIR --mode=eval \
      [--config.model.ucofia_checkpoint=pytorch_model.bin]   # the released checkpoint

Any config value can be overridden on the command line (``--config.train.batch_size=64``).
The config is validated and the inputs are checked before anything is compiled. Re-running
with the same ``--workdir`` resumes from the last checkpoint (params, optimizer, step, PRNG,
data position).
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.json, report.")
flags.DEFINE_enum(
    "mode",
    "train_and_eval",
    ["train", "eval", "train_and_eval"],
    "train: train only; eval: evaluate the workdir's (or the released) "
    "checkpoint; train_and_eval: both.",
)
flags.DEFINE_bool("progress", True, "Show a progress bar.")

log = logging.getLogger("ucofia_jax")


def prepare_synthetic_data(config, log_fn=print) -> None:
    """Demo: make the synthetic clips (MSR-VTT layout) and build the TFDS dataset if absent."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from data_pipeline import build as build_lib  # pylint: disable=g-import-not-at-top
    from data_pipeline import synthetic  # pylint: disable=g-import-not-at-top

    tfds.disable_progress_bar()
    s = config.data.synthetic
    raw = config.data.manual_dir
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
        log_fn(
            f"synthetic dataset: {s.num_train} train + {s.num_test} test clips in {raw} "
            f"({time.time() - t0:.0f} s)"
        )
    build_lib.build(
        config.data.dataset,
        manual_dir=raw,
        data_dir=config.data.data_dir,
        max_frames=config.data.max_frames,
        image_size=config.data.image_size,
        feature_framerate=config.data.feature_framerate,
        slice_framepos=config.data.slice_framepos,
        progress=False,
        log=log_fn,
    )


def load_released_checkpoint(model, params, path: str):
    """Our params with the head (and CLIP, when present) from a released UCoFiA state dict."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from ucofia_jax.models import ucofia_names  # pylint: disable=g-import-not-at-top

    parts = ucofia_names.load_original_checkpoint(path, head_template=params["head"])
    if parts["predictor"] and parts["predictor"] != model.head.predictor:
        raise ValueError(
            f"{path} has the '{parts['predictor']}' token predictor; run with "
            f"--config.model.head.predictor={parts['predictor']}"
        )
    new = {"head": jax.tree.map(jnp.asarray, parts["head_params"]), "clip": params["clip"]}
    if parts["clip_params"] is not None:
        new["clip"] = jax.tree.map(jnp.asarray, parts["clip_params"])
    return new


def run(config, workdir: str, mode: str, progress: bool = True) -> dict:
    """The whole program (importable for tests): validate, data, train, evaluate, report."""
    from ucofia_jax import distributed  # pylint: disable=g-import-not-at-top

    distributed.maybe_initialize(config)  # before anything touches jax.devices()
    if distributed.process_count() > 1:
        distributed.setup_logging()  # INFO from process 0 only, the others prefixed

    from ucofia_jax import config_validation  # pylint: disable=g-import-not-at-top

    config_validation.resolve_paths(config, workdir)
    config_validation.validate(config)
    config_validation.check_inputs(config, mode)
    if mode == "eval" and not config.model.ucofia_checkpoint:
        from ucofia_jax import checkpoints  # pylint: disable=g-import-not-at-top

        d, _ = checkpoints.find_checkpoint_dir(workdir)
        if not os.path.isdir(d) or not any(n.isdigit() for n in os.listdir(d)):
            raise FileNotFoundError(
                f"--mode=eval: no checkpoint in {workdir} (checkpoints/ or checkpoints_best/). "
                "Train first (--mode=train_and_eval with this --workdir), or evaluate the released "
                "UCoFiA weights with --config.model.ucofia_checkpoint=/path/to/pytorch_model.bin"
            )

    import jax  # pylint: disable=g-import-not-at-top

    from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    from ucofia_jax import checkpoints, evaluate, sharding, train  # pylint: disable=g-import-not-at-top
    from ucofia_jax.models.retrieval import RetrievalModel  # pylint: disable=g-import-not-at-top

    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    main_proc = distributed.is_main_process()
    writer = train.MetricWriter(workdir, enabled=main_proc)
    say = lambda msg: (writer.text(msg), print(msg, flush=True)) if main_proc else None
    if main_proc:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))

    if config.data.synthetic.enabled:
        if main_proc:
            prepare_synthetic_data(config, log_fn=say)
        distributed.sync("synthetic_data")

    mesh = sharding.make_mesh(config.mesh)
    mult = sharding.batch_size_multiple(mesh)
    for key in ("train.batch_size", "eval.batch_size"):
        sec, name = key.split(".")
        if config[sec][name] % mult:
            raise ValueError(
                f"config.{key} = {config[sec][name]} is not a multiple of the "
                f"{mult} devices on the batch axes (config.mesh)"
            )
    say(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"global batch {config.train.batch_size}"
    )

    model = RetrievalModel.from_config(config)
    encoder = evaluate.Encoder(model, mesh, config.eval)  # one per run: encoders compile once
    state = train.create_train_state(model, config, config.seed)
    if mode == "eval" and config.model.ucofia_checkpoint:
        state["params"] = load_released_checkpoint(
            model, state["params"], config.model.ucofia_checkpoint
        )

    train_data = None
    need_train_split = mode != "eval" or (config.eval.sk_norm)
    if need_train_split:
        train_data = pipeline.VideoTextData(config, split="train")
    test_data = (
        pipeline.VideoTextData(config, split=config.data.eval_split)
        if mode != "train" or config.train.eval_every_epochs > 0
        else None
    )

    ckpt = checkpoints.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    result = {}
    try:
        if mode in ("train", "train_and_eval"):
            spe = train_data.steps_per_epoch(config.train.batch_size)
            total = train.total_train_steps(config, spe)
            trainer = train.make_trainer(
                model, config, mesh, state, train.schedule_steps(config, spe)
            )
            meta = {}
            if ckpt.latest_step() is not None:
                target = train.place_state(trainer, state)
                state, meta = ckpt.restore(target)
                say(
                    f"resumed from step {int(meta['step'])} (epoch {meta['epoch']}, step "
                    f"{meta['step_in_epoch']} of it) in {workdir}/checkpoints"
                )
            else:
                state = train.place_state(trainer, state)
            guard = checkpoints.PreemptionGuard()
            data = _PipelineTrainData(train_data, config)

            def on_epoch_end(epoch, st):
                every = config.train.eval_every_epochs
                if not every or (epoch + 1) % every or test_data is None:
                    return None
                res = evaluate.evaluate(
                    model,
                    st["params"],
                    mesh,
                    config,
                    test_data,
                    rng=jax.random.PRNGKey(config.seed + 1),
                    step=int(jax.device_get(st["step"])),
                    sk_norm=False,
                    encoder=encoder,
                )
                writer.scalars(res["step"], res["t2v"], prefix="val/t2v/")
                say(f"epoch {epoch + 1}: val t2v R@1 {res['t2v']['R@1']:.1f}")
                return res["t2v"]["R@1"]

            t0 = time.time()
            state = train.train_loop(
                trainer,
                state,
                data,
                workdir=workdir,
                total_steps=total,
                checkpointer=ckpt,
                guard=guard,
                writer=writer,
                on_epoch_end=on_epoch_end,
                progress=progress and main_proc,
                meta_extra={"experiment": config.experiment},
            )
            guard.restore()
            step = int(jax.device_get(state["step"]))
            say(f"trained to step {step}/{total} in {time.time() - t0:.0f} s")
            if guard.requested:
                return {"preempted": True, "step": step}
            params = state["params"]
        else:
            step = 0
            params = state["params"]
            if not config.model.ucofia_checkpoint:
                from ucofia_jax import optim  # pylint: disable=g-import-not-at-top

                tx = optim.make_optimizer(config.train, params, 1)
                target = {
                    "step": state["step"],
                    "params": params,
                    "opt_state": jax.eval_shape(tx.init, params),
                    "rng": state["rng"],
                }
                restored, meta = checkpoints.restore_params(workdir, target)
                params, step = restored["params"], int(meta["step"])
                say(f"evaluating the checkpoint of step {step} from {workdir}")

        if mode in ("eval", "train_and_eval"):
            res = evaluate.evaluate(
                model,
                params,
                mesh,
                config,
                test_data,
                train_data=train_data,
                rng=jax.random.PRNGKey(config.seed + 1),
                step=step,
                encoder=encoder,
            )
            sim = res.pop("_similarity")
            path = evaluate.write_results(workdir, res, writer)
            if main_proc:
                with open(os.path.join(workdir, "results.md"), encoding="utf-8") as fh:
                    say(f"wrote {path} ({res['seconds']} s):\n" + fh.read())
            result = res
            if config.eval.write_report and main_proc:
                from ucofia_jax import report  # pylint: disable=g-import-not-at-top

                frames = _first_frames(test_data, config.eval.batch_size)
                html_path = report.write_report(
                    workdir,
                    res,
                    sim,
                    test_data.text_to_video,
                    test_data.texts,
                    frames,
                    test_data.video_ids,
                    title=f"UCoFiA {config.experiment}",
                )
                say(f"report: {html_path}")
    finally:
        ckpt.close()
        say(f"total wall time {time.time() - t_start:.0f} s")
        writer.close()
    return result


def _first_frames(test_data, batch):
    import numpy as np  # pylint: disable=g-import-not-at-top

    out = []
    for b in test_data.eval_video_batches(global_batch=batch):
        out.append(b["frames"][np.asarray(b["valid"], bool), 0])
    return np.concatenate(out)


class _PipelineTrainData:
    """train.TrainData over pipeline.VideoTextData (deterministic per seed and epoch)."""

    def __init__(self, data, config):
        self.data, self.config = data, config
        self.steps_per_epoch = data.steps_per_epoch(config.train.batch_size)

    def epoch(self, epoch, start_step=0):
        return self.data.train_batches(
            epoch=epoch,
            seed=self.config.seed,
            global_batch=self.config.train.batch_size,
            start_step=start_step,
            prefetch=self.config.data.prefetch,
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, progress=FLAGS.progress)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
