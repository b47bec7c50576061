"""A tiny config + random batch shared by the train / resume / main tests (fast on CPU)."""

import numpy as np

from configs import demo
from ucofia_jax.models.model import Model


def tiny_config():
    c = demo.get_config()
    c.model.clip.update(
        dict(
            embed_dim=64,
            image_resolution=16,
            vision_layers=1,
            vision_width=64,
            vision_patch_size=8,
            context_length=77,
            vocab_size=512,
            text_width=64,
            text_heads=1,
            text_layers=1,
            token_shift_blocks=(0,),
            token_shift_n_div=2,
        )
    )
    c.model.head.update(dict(num_samples=8, seq_layers=1, init_temporal_from_clip=True))
    c.data.update(dict(max_words=8, max_frames=2, image_size=16))
    c.train.update(
        dict(
            batch_size=8,
            epochs=1,
            optimizer="bertadam",
            lr=1e-3,
            clip_lr=1e-3,
            schedule="constant",
            weight_decay=0.2,
            log_every_steps=1,
        )
    )
    c.mesh.data = -1
    return c


def tiny_model(c) -> Model:
    return Model.from_config(c.model, max_frames=c.data.max_frames, max_words=c.data.max_words)


def random_arrays(n, c, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, c.model.clip.vocab_size - 1, (n, c.data.max_words)).astype(np.int32)
    ids[:, -1] = c.model.clip.vocab_size - 1  # an 'EOT' (argmax) at the end
    s = c.data.image_size
    return {
        "input_ids": ids,
        "frames": rng.integers(0, 256, (n, c.data.max_frames, s, s, 3)).astype(np.uint8),
        "frame_mask": np.ones((n, c.data.max_frames), np.int32),
        "video_index": np.arange(n),
    }
