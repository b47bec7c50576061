"""Annotation readers, one module per dataset; each has the same entry point:

  read_split(root, split, *, video_dir=None, expand_sentences=False, strict=False,
             report=None) -> list[ClipRecord]

``video_dir`` defaults to ``root/videos``. ``expand_sentences`` gives one record per caption
(the training recipe for MSR-VTT / MSVD / VATEX); without it a record holds all captions of
its video (multi-sentence evaluation, or one random caption per epoch in the pipeline).
ActivityNet and DiDeMo always give one paragraph per video. Each module also names the
dataset (``NAME``), the splits its reader knows (``SPLITS``) and what a build needs
(``SPEC``, a `records.DatasetSpec`).

A module states only its files and its rules, in ``videos(root, split, report, strict)`` ->
(video id, captions) pairs, written with the shared reader loop (`_common.group_captions`,
`_common.listed`); ``read_split = _common.make_read_split(...)`` does the rest (split check,
paragraphs, clip times, video files, records) the same way for all.
"""

from data_pipeline.datasets import activitynet, didemo, lsmdc, msrvtt, msvd, vatex

# The one list of supported datasets, in the order they are shown everywhere; every other
# list (readers, splits, specs, `builder.DATASETS`, the build choices) is derived from it.
MODULES = (msrvtt, msvd, lsmdc, activitynet, didemo, vatex)
READERS = {m.NAME: m.read_split for m in MODULES}
SPLITS = {m.NAME: m.SPLITS for m in MODULES}
SPECS = {m.NAME: m.SPEC for m in MODULES}


def get_reader(name: str):
    """The reader for dataset `name`; a ValueError lists the known names otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(READERS))}") from None
