"""MSR-VTT 9k train / JSFusion 1k-A test: the original scripts' recipe (SPEC §9.1).

  python -m ucofia_jax.main --config=configs/msrvtt.py --workdir=workdir/msrvtt

Hyperparameters beyond MSR-VTT/VATEX are not in the original scripts; they follow the paper
(batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP) as far as SPEC §9.3 could establish.
"""

from ucofia_jax.config import base_config


def get_config():
    c = base_config()
    c.experiment = "msrvtt"
    c.data.dataset = "msrvtt"
    c.data.manual_dir = "data/raw/msrvtt"

    return c
