"""VATEX: 12 frames / 32 words; 10 captions per video; multi-sentence evaluation.

  python -m ucofia_jax.main --config=configs/vatex.py --workdir=workdir/vatex

Hyperparameters beyond MSR-VTT/VATEX are not in the original scripts; they follow the paper
(batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP) as far as SPEC §9.3 could establish.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "vatex"
    c.data.dataset = "vatex"
    c.data.manual_dir = "data/raw/vatex"
    return c
