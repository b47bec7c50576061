"""LSMDC: 12 frames / 32 words; clips with start/end times (SPEC §11).

  python -m ucofia_jax.main --config=configs/lsmdc.py --workdir=workdir/lsmdc

Hyperparameters beyond MSR-VTT/VATEX are not in the original scripts; they follow the paper
(batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP) as far as SPEC §9.3 could establish.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "lsmdc"
    c.data.dataset = "lsmdc"
    c.data.manual_dir = "data/raw/lsmdc"
    c.data.expand_sentences = False  # one caption per clip already
    return c
