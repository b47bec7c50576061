"""Shared base config: every knob of the model and the recipe, with the paper's defaults.

Each experiment file (``configs/<dataset>.py``) calls :func:`get_base_config` and overrides
what differs; ``ucofia_jax.config_validation.validate`` checks the result before anything is
compiled. Values follow SPEC §9 (the original MSR-VTT recipe) unless a comment says why not.
"""

from __future__ import annotations

import ml_collections

# CLIP ViT-B/32 sizes (OpenAI). ``checkpoint`` = '' trains CLIP from scratch.
VIT_B32 = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
)

# Which CLIP params the original freezes (SPEC §3, main_ucofia.py:445-464): every CLIP param
# outside the resblocks and ln_final/text_projection/logit_scale/visual.ln_post/visual.proj.
FROZEN_CLIP = (
    "token_embedding",
    "positional_embedding",
    "visual/conv1",
    "visual/class_embedding",
    "visual/positional_embedding",
    "visual/ln_pre",
)


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.experiment = "base"

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    c.model.clip = ml_collections.ConfigDict(
        dict(
            checkpoint="",  # HF CLIPModel dir / OpenAI ViT-B-32.pt; '' = from scratch
            **VIT_B32,
            token_shift_blocks=(10, 11),  # TS2-Net shift on visual blocks 10-11 (SPEC §3)
            token_shift_n_div=7,
            dtype="float32",  # backbone matmuls: 'float32' | 'bfloat16'
        )
    )
    c.model.head = ml_collections.ConfigDict(
        dict(
            tau=0.01,
            topk=3,
            num_samples=500,
            sigma=0.05,
            seq_layers=4,
            predictor="new",
            # Quirk flags: False/True = the original behaviour (SPEC §12, docs/head.md).
            selection_noise_at_eval=True,
            mask_padding=False,
            scale_pixel_word=False,
            eval_local_mat_weight1=False,
            init_temporal_from_clip=True,  # seqTransf <- CLIP text blocks 0..3 (SPEC §5)
            # Generator of the inference selection noise: 'hash' (cheap counter hash, default) or
            # 'threefry' (jax.random.normal); same N(0, 1), different draws. Training: threefry.
            eval_noise_prng="hash",
            # Level 3 of blockwise evaluation after its GEMM: 'auto' (the fused native CPU kernel on
            # a CPU backend when a C++ compiler builds it, else XLA), 'xla' or 'native' (insist).
            # Same values to float32 rounding (docs/head.md, "Native CPU kernel").
            level3_kernel="auto",
        )
    )
    # A released UCoFiA state dict (pytorch_model.bin) for --mode=eval; '' = none.
    c.model.ucofia_checkpoint = ""

    # ------------------------------------------------------------------ data
    c.data = ml_collections.ConfigDict(
        dict(
            dataset="msrvtt",
            data_dir="data/tfds",  # TFDS data_dir (built by python -m data_pipeline.build)
            manual_dir="data/raw/msrvtt",  # raw videos + annotation files
            max_words=32,
            max_frames=12,
            image_size=224,
            feature_framerate=1,
            slice_framepos=2,
            expand_sentences=True,  # MSR-VTT 9k: every caption a training sample
            multi_sentence=False,  # MSVD/VATEX eval: several captions per video
            paragraph=False,  # ActivityNet/DiDeMo: captions joined per video
            train_split="train",
            eval_split="test",
            shuffle_buffer=2048,
            prefetch=2,
            num_parallel_calls=-1,  # tf.data.AUTOTUNE
            synthetic=ml_collections.ConfigDict(
                dict(
                    # True: make data_pipeline.synthetic's set (MSR-VTT layout) in the workdir if absent
                    enabled=False,
                    num_train=300,
                    num_test=100,
                    frame_size=64,
                    num_seconds=4,
                    fps=6,
                    captions_per_video=5,
                    seed=0,
                )
            ),
        )
    )

    # ------------------------------------------------------------------ training
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,  # global batch = number of negatives + 1
            epochs=15,
            num_steps=-1,  # >0: stop after this many steps (smoke runs, benchmarks)
            optimizer="bertadam",  # 'bertadam' (original) | 'adamw'
            lr=1e-4,  # new modules (UCoFiA head)
            clip_lr=1e-7,  # CLIP backbone = lr * coef_lr 1e-3
            warmup_proportion=0.1,
            schedule="warmup_cosine",  # 'warmup_cosine' (original) | 'constant'
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.2,
            grad_clip=1.0,  # global norm clip (main_ucofia.py:278)
            per_tensor_clip=1.0,  # BertAdam's per-tensor clip (optimization.py:135)
            logit_scale_max=4.605170185988092,  # ln 100, clamped after every step
            frozen=FROZEN_CLIP,  # param paths (under 'clip/') that never change
            log_every_steps=10,
            checkpoint_every_steps=1000,
            keep_checkpoints=2,
            eval_every_epochs=1,  # validation (R@1 picks the best checkpoint)
            stop_on_nonfinite=True,
        )
    )

    # ------------------------------------------------------------------ evaluation
    c.eval = ml_collections.ConfigDict(
        dict(
            batch_size=32,  # encoding batch (texts and videos)
            text_block=256,  # blockwise head: texts x videos per block
            video_block=64,
            sk_norm=True,
            sk_bank_size=-1,  # training texts in the SK query bank; -1 = all
            sk_iters=4,
            sk_domain="plain",  # 'plain' (original) | 'log' (finite where plain overflows)
            sk_v2t_bank_size=1000,  # training videos for the v2t prior (encoded; costly)
            write_report=False,
        )
    )

    # ------------------------------------------------------------------ devices
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.distributed = ml_collections.ConfigDict(dict(mode="auto"))
    return c
