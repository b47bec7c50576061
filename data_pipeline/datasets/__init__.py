"""Annotation readers, one module per dataset; each has the same entry point:

  read_split(root, split, *, video_dir=None, expand_sentences=False, strict=False,
             report=None) -> list[ClipRecord]

``video_dir`` defaults to ``root/videos``. ``expand_sentences`` gives one record per caption
(the training recipe for MSR-VTT / MSVD / VATEX); without it a record holds all captions of
its video (multi-sentence evaluation, or one random caption per epoch in the pipeline).
ActivityNet and DiDeMo always give one paragraph per video.
"""

from data_pipeline.datasets import activitynet, didemo, lsmdc, msrvtt, msvd, vatex

READERS = {
    "msrvtt": msrvtt.read_split,
    "msvd": msvd.read_split,
    "lsmdc": lsmdc.read_split,
    "activitynet": activitynet.read_split,
    "didemo": didemo.read_split,
    "vatex": vatex.read_split,
}
SPLITS = {m.NAME: m.SPLITS for m in (msrvtt, msvd, lsmdc, activitynet, didemo, vatex)}


def get_reader(name: str):
    """The reader for dataset `name`; a ValueError lists the known names otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(READERS))}") from None
