"""Does the shortlist keep its promise on a trained model? On a real index (the trained
demo's by default: its 500 clips, queried with its 100 test captions), for each shortlist
K: the two-stage top-10 against the exhaustive top-10 (every row scored by the full score),
and the retrieval quality of both (R@1 / R@5 of each caption's own clip).

Two shortlists are compared, both re-ranked by the same full score:

* ``coarse``: what search uses, the model's own video-sentence level with its trained
  projections (``SearchModel.shortlist_query`` . stored vector);
* ``sentence . vector``: the plain cosine without the projections (what search used before).

Overlap = |two-stage top-10 & exhaustive top-10| / 10 per caption (mean, and min); a K below
10 returns K rows, so it cannot exceed K / 10.

    python benchmarks/search_recall.py [--index workdir/demo/videos.ucofia]
        [--captions DATA/raw/MSRVTT_JSFUSION_test.csv] [--ks 5,10,20,50,100,200]

``--captions``: a CSV with ``video_id`` and ``sentence`` columns (default: the demo's test
captions next to the index, ``<index>/../data/raw/MSRVTT_JSFUSION_test.csv``); a caption's
own clip is the row whose path is ``<video_id>.mp4``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import jax
import numpy as np

from ucofia_jax.search import scoring
from ucofia_jax.search.index import Index
from ucofia_jax.search.store import features_from_arrow

TOP = 10


def _recall_at(rows: np.ndarray, target: int, n: int) -> float:
    return float(target in rows[:n].tolist())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", default="workdir/demo/videos.ucofia")
    p.add_argument("--captions", default="")
    p.add_argument("--ks", default="5,10,20,50,100,200")
    a = p.parse_args()
    captions = Path(a.captions or Path(a.index).parent / "data/raw/MSRVTT_JSFUSION_test.csv")
    with open(captions, encoding="utf-8", newline="") as f:
        pairs = [(row["video_id"], row["sentence"]) for row in csv.DictReader(f)]
    index = Index.open(a.index)
    model = index.model
    shapes = index.meta["shapes"]
    n = len(index)
    row_of = {path: i for i, path in enumerate(index.paths)}
    targets = [row_of[f"{vid}.mp4"] for vid, _ in pairs]
    texts = [t for _, t in pairs]
    text = model.encode_texts(texts)
    vectors = features_from_arrow(index.store.read_columns(["vector"]), shapes)["vector"]
    token_columns = [c for c in ("frames", "pixels", "mask") if c in shapes]

    def fetch(rows):
        feats = features_from_arrow(index.store.take(rows, token_columns), shapes)
        return feats | {"vector": vectors[rows]}

    def ranked(queries, k):
        return scoring.two_stage(
            text,
            queries,
            vectors,
            k=k,
            top=min(k, TOP),
            fetch=fetch,
            score=model.score,
            text_row=lambda t, i: jax.tree.map(lambda x: x[i : i + 1], t),
        )

    shortlists = {
        "coarse": model.shortlist_query(text),
        "sentence . vector": np.asarray(text.sentence, np.float32),
    }
    exhaustive = [rows for rows, _ in ranked(shortlists["coarse"], n)]
    r1 = np.mean([_recall_at(r, t, 1) for r, t in zip(exhaustive, targets)])
    r5 = np.mean([_recall_at(r, t, 5) for r, t in zip(exhaustive, targets)])
    print(
        f"{a.index}: {n} rows, {len(texts)} captions ({captions.name}); exhaustive full "
        f"score: R@1 {r1:.2f}, R@5 {r5:.2f}"
    )
    print("| shortlist | K | top-10 overlap (mean / min) | R@1 | R@5 |\n|---|---|---|---|---|")
    for name, queries in shortlists.items():
        for k in [int(x) for x in a.ks.split(",")]:
            got = [rows for rows, _ in ranked(queries, k)]
            overlap = [
                len(set(g[:TOP].tolist()) & set(e[:TOP].tolist())) / TOP
                for g, e in zip(got, exhaustive)
            ]
            r1 = np.mean([_recall_at(r, t, 1) for r, t in zip(got, targets)])
            r5 = np.mean([_recall_at(r, t, 5) for r, t in zip(got, targets)])
            print(
                f"| {name} | {k} | {np.mean(overlap):.3f} / {np.min(overlap):.1f} "
                f"| {r1:.2f} | {r5:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
