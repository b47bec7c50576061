"""MSR-VTT with CLIP ViT-B/16: the B/32 recipe of ``configs/msrvtt.py`` on a finer patch grid.

  python -m ucofia_jax.main --config=configs/msrvtt_b16.py --workdir=workdir/msrvtt_b16 \
      --config.model.clip.checkpoint=/path/to/ViT-B-16.pt   # or a HF openai/clip-vit-base-patch16 dir

Same as the B/32 recipe (SPEC §9.1): 12 frames x 32 words, global batch 128, 15 epochs,
lr 1e-4 head / 1e-7 CLIP, TS2-Net token shift on visual blocks 10-11, the same towers' widths
(768 vision, 512 text, 512 joint). What differs:

* patch 16: 1 + 14 x 14 = 197 tokens per frame instead of 50, so the vision tower costs
  about 4x the FLOPs and activation memory of B/32. ``model.remat='full'`` keeps only each
  block's input (gradients unchanged); if a batch of 128 still does not fit, raise
  ``train.accumulate_steps`` (exact: the contrastive loss still sees all 128 x 128 pairs)
  rather than lowering the batch, which changes the number of negatives.
* the token selector keeps its top-k of 196 patches instead of 49 (``model.head.topk``
  unchanged: 4 per frame, as in the paper).
"""

from configs import msrvtt


def get_config():
    c = msrvtt.get_config()
    c.experiment = "msrvtt_b16"
    c.model.clip.vision_patch_size = 16
    c.model.remat = "full"
    return c
