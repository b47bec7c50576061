"""Can a search say "no good match"? On a real index (the trained demo's by default): the
index's own test captions (positives) against nonsense and off-domain queries (negatives),
the AUROC of several per-query statistics of the best hit, the search's ``confidence``
among them, and how often ``no_good_match`` fires on each set.

Statistics of a query's best hit (every row scored: K = all rows):

* ``confidence``: what ``Index.search`` returns for its first hit (``scoring.confidence``
  of the hit's coarse standard score against the background sample);
* ``z coarse vs background``: the best coarse score's standard score against the query's
  coarse scores on the background sample (``scoring.background_rows``: every row of a
  collection up to 4,096 rows), what the confidence maps;
* ``z full vs all rows``: the best full score's standard score against the full scores of
  every row;
* ``z full vs 64 rows``: the same against a sample of 64 rows (a background whose full
  scores a query could afford);
* ``best score``: the raw full score;
* ``gap``: best minus second-best full score.

The last lines give the threshold on ``z coarse vs background`` that best separates the two
sets (Youden's J: the most real captions kept minus nonsense let through), what
``scoring.CONFIDENCE_MIDPOINT`` is set from.

    python benchmarks/search_confidence.py [--index workdir/demo/videos.ucofia]
        [--captions DATA/raw/MSRVTT_JSFUSION_test.csv]

``--captions``: a CSV with a ``sentence`` column (default: the demo's test captions, found
next to the index: ``<index>/../data/raw/MSRVTT_JSFUSION_test.csv``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from ucofia_jax.search import scoring
from ucofia_jax.search.index import Index, no_good_match

# Queries with nothing to find in a collection of coloured shapes: gibberish, and things
# a person might type into their own collection that the demo has never seen.
NONSENSE = [
    "asdf qwerty zxcv 12345",
    "quarterly tax report spreadsheet",
    "lorem ipsum dolor sit amet",
    "xkcd blorp fizzbuzz",
    "the mitochondria is the powerhouse of the cell",
    "how to bake sourdough bread",
    "a dog catches a frisbee in the park",
    "a man playing guitar on stage",
    "football match highlights",
    "birthday party with cake and candles",
    "a cat sleeping on a sofa",
    "wedding ceremony in a church",
    "cooking pasta in a kitchen",
    "snowboarding down a mountain",
    "a lecture about linear algebra",
    "traffic jam on the highway at night",
    "children swimming in a pool",
    "a politician giving a speech",
    "stock market crash news",
    "unboxing a new smartphone",
    "the history of the roman empire",
    "a woman singing opera",
    "a car commercial with dramatic music",
    "rain falling on a window",
    "fireworks over the city",
    "a baby laughing",
    "zebra crossing the savanna",
    "surgery in an operating room",
    "qqqq wwww eeee rrrr",
    "9876543210",
    "!!! ??? ...",
    "hello world",
    "please find my vacation photos from 2019",
    "minutes of the board meeting",
    "invoice number 4471 overdue",
    "recipe for chocolate chip cookies",
    "a drone flying over a forest",
    "basketball dunk in slow motion",
    "a horse running on a beach",
    "kids building a sandcastle",
    "electric guitar solo",
    "people dancing at a club",
    "a chef slicing onions",
    "an airplane taking off",
    "a documentary about whales",
    "video game walkthrough level 3",
    "my grandmother's garden in spring",
    "zzzz",
    "the quick brown fox jumps over the lazy dog",
    "a spreadsheet of sales figures",
    "teeth whitening advertisement",
    "a cartoon about talking animals",
    "mountain bike trail crash",
    "ocean waves at sunset",
    "a podcast about economics",
]


def auroc(positives, negatives) -> float:
    """P(a random positive's statistic > a random negative's), ties counted half."""
    p = np.asarray(positives, np.float64)[:, None]
    n = np.asarray(negatives, np.float64)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))


def statistics(index: Index, texts) -> dict:
    """Per text, the statistics of the module doc (K = all rows)."""
    n = len(index)
    sample = scoring.background_rows(n, 64)
    names = ("z coarse vs background", "z full vs all rows", "z full vs 64 rows", "best score")
    out = {k: [] for k in (*names, "gap", "confidence", "no good match")}
    for t in texts:
        r = index.rank([t], shortlist=n)[0]
        by_row = np.empty(n)
        by_row[r.rows] = r.scores
        hits = index.search([t], top=10)[0]
        out["z coarse vs background"].append(float(r.z.max()))
        out["z full vs all rows"].append(float(scoring.standard_scores(r.scores[0], by_row)))
        out["z full vs 64 rows"].append(float(scoring.standard_scores(r.scores[0], by_row[sample])))
        out["best score"].append(float(r.scores[0]))
        out["gap"].append(float(r.scores[0] - r.scores[1]))
        out["confidence"].append(hits[0].confidence)
        out["no good match"].append(no_good_match(hits))
    return out


def best_threshold(positives, negatives) -> tuple:
    """(threshold, true positive rate, false positive rate) maximising TPR - FPR, the
    threshold half-way between neighbouring observed values."""
    values = np.sort(np.concatenate([positives, negatives]))
    cuts = (values[1:] + values[:-1]) / 2
    p, n = np.asarray(positives)[:, None], np.asarray(negatives)[:, None]
    tpr, fpr = (p > cuts).mean(0), (n > cuts).mean(0)
    j = int(np.argmax(tpr - fpr))
    return float(cuts[j]), float(tpr[j]), float(fpr[j])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", default="workdir/demo/videos.ucofia")
    p.add_argument("--captions", default="")
    a = p.parse_args()
    captions = Path(a.captions or Path(a.index).parent / "data/raw/MSRVTT_JSFUSION_test.csv")
    with open(captions, encoding="utf-8", newline="") as f:
        real = [row["sentence"] for row in csv.DictReader(f)]
    index = Index.open(a.index)
    pos, neg = statistics(index, real), statistics(index, NONSENSE)
    print(
        f"{a.index}: {len(index)} rows; {len(real)} real captions ({captions.name}) vs "
        f"{len(NONSENSE)} nonsense / off-domain queries; background sample "
        f"{len(scoring.background_rows(len(index)))} rows"
    )
    print("| statistic of the best hit | AUROC | real: median | nonsense: median |")
    print("|---|---|---|---|")
    for name in [k for k in pos if k != "no good match"]:
        print(
            f"| {name} | {auroc(pos[name], neg[name]):.3f} | {np.median(pos[name]):.2f} "
            f"| {np.median(neg[name]):.2f} |"
        )
    name = "z coarse vs background"
    cut, tpr, fpr = best_threshold(pos[name], neg[name])
    print(
        f"\nbest threshold on {name}: {cut:.2f} (real above it {tpr:.0%}, nonsense {fpr:.0%}); "
        f"real 10/90% quantiles {np.quantile(pos[name], 0.1):.2f} / "
        f"{np.quantile(pos[name], 0.9):.2f}, nonsense {np.quantile(neg[name], 0.1):.2f} / "
        f"{np.quantile(neg[name], 0.9):.2f}"
    )
    print(
        f"no_good_match (midpoint {scoring.CONFIDENCE_MIDPOINT}, width "
        f"{scoring.CONFIDENCE_WIDTH}): {np.mean(pos['no good match']):.0%} of real captions, "
        f"{np.mean(neg['no good match']):.0%} of nonsense queries"
    )


if __name__ == "__main__":
    main()
