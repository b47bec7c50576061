"""MSR-VTT with CLIP ViT-L/14 (224 px): the B/32 recipe of ``configs/msrvtt.py`` on OpenAI's
large CLIP.

  python -m ucofia_jax.main --config=configs/msrvtt_l14.py --workdir=workdir/msrvtt_l14 \
      --config.model.clip.checkpoint=/path/to/ViT-L-14.pt   # or a HF openai/clip-vit-large-patch14 dir

The paper reports ViT-B; this file keeps its recipe where it can (12 frames x 32 words,
global batch 128, 15 epochs, lr 1e-4 head / 1e-7 CLIP, token shift on the last two visual
blocks, four patches kept per frame). What differs:

* sizes: 24 vision blocks of width 1024 (16 heads of 64), patch 14 (1 + 16 x 16 = 257 tokens
  per frame), 12 text blocks of width 768 (12 heads), joint width 768; the token shift moves
  to visual blocks 22-23 (the last two, as 10-11 are for B/32).
* memory: about 3x the parameters of B/32 and 5x its tokens per frame, so ``model.remat``
  is 'full' (exact gradients, one more forward in the backward). On an accelerator the
  default ``model.clip.dtype='auto'`` runs the matmuls in bf16 (LayerNorm, softmax and the
  residual stream stay f32). If batch 128 still does not fit, raise
  ``train.accumulate_steps`` (the contrastive loss still sees all 128 x 128 pairs) rather
  than lowering the batch, which changes the number of negatives.
* the temporal encoder (``model.head.seq_layers`` blocks) starts from the first 4 of CLIP's
  12 text blocks of width 768, as B/32's starts from its width-512 ones.
"""

from configs import msrvtt


def get_config():
    c = msrvtt.get_config()
    c.experiment = "msrvtt_l14"
    c.model.clip.update(
        dict(
            embed_dim=768,
            image_resolution=224,
            vision_layers=24,
            vision_width=1024,
            vision_heads=16,
            vision_patch_size=14,
            text_width=768,
            text_heads=12,
            text_layers=12,
            token_shift_blocks=(22, 23),
        )
    )
    c.model.remat = "full"
    return c
