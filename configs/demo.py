"""The CPU demo: a small CLIP-style model trained from scratch plus the UCoFiA head on a
synthetic video-text set made in the workdir, then evaluation and a report.

  python -m ucofia_jax.main --config=configs/demo.py --workdir=workdir/demo

Sized to finish in well under 10 minutes on 2 CPU cores. Nothing is pretrained, so the
original recipe's tiny CLIP lr (1e-7) and frozen embeddings would leave the towers at their
random init: here everything trains at one from-scratch lr, nothing is frozen
(``model.clip.from_scratch=True``: without it, training refuses an empty CLIP checkpoint).

The mesh is the default, every device of every process (``mesh.data=-1``), so the same file
runs as one process or several (``bash launch.sh cpu-multiprocess 2 --devices-per-process=2
...``); the batch sizes (train 32, eval 40) divide over 1, 2, 4 or 8 devices.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "demo"
    c.seed = 0

    c.model.clip.update(
        dict(
            checkpoint="",
            from_scratch=True,
            embed_dim=64,
            image_resolution=32,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=8,
            context_length=77,
            vocab_size=49408,
            text_width=64,
            text_heads=2,
            text_layers=2,
            token_shift_blocks=(1,),
            token_shift_n_div=7,
            dtype="float32",
        )
    )
    c.model.head.update(dict(num_samples=64, seq_layers=1, init_temporal_from_clip=False))

    c.data.dataset = "msrvtt"  # the synthetic set is in MSR-VTT layout
    c.data.data_dir = ""  # '' = <workdir>/data/tfds
    c.data.manual_dir = ""  # '' = <workdir>/data/raw
    c.data.max_words = 16
    c.data.max_frames = 4
    c.data.image_size = 32
    c.data.expand_sentences = True
    c.data.synthetic.update(
        dict(
            enabled=True,
            num_train=400,
            num_test=100,
            frame_size=32,
            num_seconds=4,
            fps=2,
            captions_per_video=5,
            seed=0,
        )
    )

    c.train.update(
        dict(
            batch_size=32,
            epochs=6,
            optimizer="adamw",
            lr=1e-3,
            clip_lr=1e-3,
            warmup_proportion=0.1,
            weight_decay=0.01,
            frozen=(),
            log_every_steps=5,
            checkpoint_every_steps=200,
            keep_checkpoints=2,  # a damaged latest checkpoint falls back to the previous
            eval_every_epochs=0,
        )
    )

    c.eval.update(
        dict(
            batch_size=40,
            text_block=100,
            video_block=100,
            sk_norm=True,
            sk_bank_size=400,
            sk_v2t_bank_size=100,
            write_report=True,
        )
    )
    return c
