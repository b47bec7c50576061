"""MSVD: 12 frames / 32 words; every caption a sample; multi-sentence evaluation (SPEC §10).

  python -m ucofia_jax.main --config=configs/msvd.py --workdir=workdir/msvd

Hyperparameters beyond MSR-VTT/VATEX are not in the original scripts; they follow the paper
(batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP) as far as SPEC §9.3 could establish.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "msvd"
    c.data.dataset = "msvd"
    c.data.manual_dir = "data/raw/msvd"
    return c
