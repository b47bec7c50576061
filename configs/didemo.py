"""DiDeMo: paragraph-to-video, 64 words / 64 frames, clip 0-31 s (SPEC §11).

  python -m ucofia_jax.main --config=configs/didemo.py --workdir=workdir/didemo

Hyperparameters beyond MSR-VTT/VATEX are not in the original scripts; they follow the paper
(batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP) as far as SPEC §9.3 could establish.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "didemo"
    c.data.dataset = "didemo"
    c.data.manual_dir = "data/raw/didemo"
    c.data.max_words = 64
    c.data.max_frames = 64
    c.data.expand_sentences = False
    c.eval.batch_size = 8
    c.eval.video_block = 16
    return c
