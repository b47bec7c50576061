"""Search scoring as pure functions (ucofia_jax/search/scoring.py) and the query side's
doors: the coarse shortlist is the head's own video-sentence level (Model.coarse_query via
SearchModel.shortlist_query), moments merged by non-maximum suppression with at most
``per_file`` per file, the confidence and ``no_good_match``, and the shortlist on LanceDB's
vector index (Store's ANN block) equal to the exact one where the index searches all its
lists."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from _tiny import tiny_config, tiny_model

from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.search import scoring
from ucofia_jax.search.index import Hit, Index, no_good_match
from ucofia_jax.search.source import ModelSource, SearchModel
from ucofia_jax.search.store import Store, now_iso

# =========================================================================== moments -> hits


def test_temporal_iou_of_ranges_and_whole_files():
    assert scoring.temporal_iou((0.0, 8.0), (4.0, 12.0)) == pytest.approx(4 / 12)
    assert scoring.temporal_iou((0.0, 4.0), (4.0, 8.0)) == 0.0  # touching, not overlapping
    assert scoring.temporal_iou((2.0, 6.0), (0.0, 8.0)) == pytest.approx(0.5)
    assert scoring.temporal_iou((None, None), (3.0, 5.0)) == 1.0  # a whole file holds all


def _windows():
    """Two files: a.mp4 cut in 8 s windows at stride 4 (0-8, 4-12, 8-16, 16-24), b.mp4 whole."""
    files = ["a.mp4", "a.mp4", "a.mp4", "a.mp4", "b.mp4"]
    starts = [0.0, 4.0, 8.0, 16.0, None]
    ends = [8.0, 12.0, 16.0, 24.0, None]
    scores = np.array([5.0, 9.0, 8.0, 7.0, 6.0])
    return scores, files, starts, ends


def test_select_hits_merges_overlapping_windows_and_caps_per_file():
    scores, files, starts, ends = _windows()
    # per_file 1: the best window of a (4-12), then b.
    got = scoring.select_hits(scores, files, starts, ends, top=10, per_file=1)
    assert got.tolist() == [1, 4]
    # per_file 3: 8-16 and 0-8 overlap the kept 4-12 (IoU 1/3 > 0.3) and are suppressed;
    # 16-24 does not overlap it and is a second moment of a.
    got = scoring.select_hits(scores, files, starts, ends, top=10, per_file=3)
    assert got.tolist() == [1, 3, 4]
    # A looser threshold keeps overlapping windows; top cuts the list.
    got = scoring.select_hits(scores, files, starts, ends, top=10, per_file=3, iou=0.5)
    assert got.tolist() == [1, 2, 3, 4]
    got = scoring.select_hits(scores, files, starts, ends, top=2, per_file=3, iou=0.5)
    assert got.tolist() == [1, 2]
    with pytest.raises(ValueError, match="per_file"):
        scoring.select_hits(scores, files, starts, ends, top=2, per_file=0)


def test_whole_files_each_give_one_hit():
    scores = np.array([1.0, 3.0, 2.0])
    got = scoring.select_hits(scores, ["x", "y", "z"], [None] * 3, [None] * 3, top=10, per_file=2)
    assert got.tolist() == [1, 2, 0]


# =========================================================================== confidence


def test_confidence_is_increasing_bounded_and_half_at_the_midpoint():
    z = np.linspace(-50, 50, 2001)
    c = scoring.confidence(z)
    assert np.all((c >= 0) & (c <= 1)) and np.all(np.diff(c) >= 0)
    assert np.all(np.diff(scoring.confidence(np.linspace(0, 4, 41))) > 0)
    assert scoring.confidence(scoring.CONFIDENCE_MIDPOINT) == pytest.approx(0.5)
    assert scoring.confidence(scoring.CONFIDENCE_MIDPOINT + 10 * scoring.CONFIDENCE_WIDTH) > 0.99


def test_standard_scores_against_the_background():
    bg = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, std sqrt(1.25)
    got = scoring.standard_scores(np.array([2.5, 5.0]), bg)
    np.testing.assert_allclose(got, [0.0, 2.5 / np.sqrt(1.25)])
    assert scoring.standard_scores(np.array([1.0]), np.zeros(0)).tolist() == [0.0]


def test_background_rows_are_fixed_and_cover_small_collections():
    assert scoring.background_rows(10).tolist() == list(range(10))
    a, b = scoring.background_rows(10_000, 64), scoring.background_rows(10_000, 64)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 64 and a.max() < 10_000


def _hit(confidence: float) -> Hit:
    return Hit(1, 1.0, confidence, "a.mp4", None, None, "0" * 16)


def test_no_good_match_when_the_best_hit_is_at_the_background():
    assert no_good_match([])
    assert no_good_match([_hit(0.2), _hit(0.4)])
    assert not no_good_match([_hit(0.4), _hit(0.7)])
    assert not scoring.is_no_good_match([0.5])


# =========================================================================== coarse shortlist


def _tiny_search_model():
    """The tiny model with trained-like (non-identity) video-sentence projections."""
    c = tiny_config()
    model = tiny_model(c)
    params = jax.device_get(model.init(jax.random.PRNGKey(0)))
    d = c.model.clip.embed_dim
    rng = np.random.default_rng(0)
    head = dict(params["head"])
    for name in ("global_mat_weight", "global_mat_weight_1"):
        head[name] = np.eye(d, dtype=np.float32) + 3 * rng.standard_normal((d, d)).astype(
            np.float32
        ) / np.sqrt(d)
    params = {**params, "head": head}
    return SearchModel(ModelSource(workdir="/tiny"), c, model, params, "tiny", {}), c


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_shortlist_is_the_heads_video_sentence_level():
    """The shortlist ranks by the head's level 1 (``Model.score``'s video_sentence), with the
    projections: a shortlist by the plain sentence . vector cosine fails this."""
    sm, c = _tiny_search_model()
    d, f, w = c.model.clip.embed_dim, c.data.max_frames, c.data.max_words
    p = f * (c.model.head.topk + 1)
    rng = np.random.default_rng(1)
    text = TextFeatures(
        sentence=_unit(rng.normal(size=(3, d))), words=_unit(rng.normal(size=(3, w, d)))
    )
    video = VideoFeatures(
        video=_unit(rng.normal(size=(40, d))),
        frames=_unit(rng.normal(size=(40, f, d))),
        pixels=_unit(rng.normal(size=(40, p, d))),
        mask=np.ones((40, f), np.int32),
    )
    level1 = np.asarray(sm.model.score(sm.params, text, video).video_sentence)
    queries = sm.shortlist_query(text)
    coarse = scoring.coarse_scores(queries, video.video)
    np.testing.assert_allclose(coarse, level1, rtol=1e-4, atol=1e-3)
    short = scoring.shortlist(queries, video.video, 8)
    for t in range(3):
        assert short[t].tolist() == np.argsort(-level1[t], kind="stable")[:8].tolist()
    # clip_only keeps the CLIP cosine.
    clip_only = dataclasses.replace(sm, source=ModelSource(clip="/tiny.pt", clip_only=True))
    np.testing.assert_array_equal(clip_only.shortlist_query(text), text.sentence)


def test_two_stage_reranks_the_shortlist_and_equals_exhaustive_when_k_covers_all():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    full = rng.normal(size=(3, 50)).astype(np.float32)  # an unrelated "full" score

    def two_stage(k):
        return scoring.two_stage(
            None,
            queries,
            vectors,
            k=k,
            top=10,
            fetch=lambda rows: {"rows": np.asarray(rows)},
            score=lambda i, feats: full[i][None, feats["rows"]],
            text_row=lambda _t, i: i,
        )

    for i, (rows, s) in enumerate(two_stage(50)):
        assert rows.tolist() == np.argsort(-full[i], kind="stable")[:10].tolist()
        np.testing.assert_array_equal(s, full[i][rows])
    short = scoring.shortlist(queries, vectors, 12)
    for i, (rows, _) in enumerate(two_stage(12)):
        inside = short[i]
        assert rows.tolist() == inside[np.argsort(-full[i][inside], kind="stable")][:10].tolist()
    # K below top: the candidates are still the shortlist's, an exhaustive winner outside missed.
    short = scoring.shortlist(queries, vectors, 10)
    for i, (rows, _) in enumerate(two_stage(5)):
        assert set(rows.tolist()) <= set(short[i].tolist())
    assert scoring.top_k(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]
    assert scoring.overlap_at(np.arange(10), np.arange(5, 15)) == 0.5


# =========================================================================== ANN shortlist

D_ANN, N_ANN = 16, 400


class _DotModel:
    """A stand-in for SearchModel on a clip_only store: text "i" is query vector i, the
    coarse and the full score are both its dot product with the stored vector."""

    fingerprint = "dot"
    source = ModelSource(clip="/dot.pt", clip_only=True)

    def __init__(self, queries):
        self.queries = queries

    def encode_texts(self, texts):
        return self.queries[[int(t) for t in texts]]

    def shortlist_query(self, text):
        return np.asarray(text, np.float32)

    def score(self, text, feats):
        return np.asarray(text, np.float32) @ feats["vector"].T


def _dot_store(path) -> Store:
    meta = {
        "root": "/dot",
        "fingerprint": "dot",
        "source": _DotModel.source.to_dict(),
        "description": {},
        "clip_only": True,
        "shapes": {"vector": [D_ANN]},
        "shortlist": 10,
        "created": now_iso(),
        "updated": now_iso(),
    }
    store = Store.create(path, meta)
    # Norms varied (0.5 to 2): the dot product then ranks rows unlike l2 or cosine, so an
    # index built or searched with either of those returns other rows.
    rng = np.random.default_rng(2)
    vectors = _unit(rng.normal(size=(N_ANN, D_ANN))) * rng.uniform(0.5, 2.0, size=(N_ANN, 1))
    store.add_rows(
        [
            {
                "path": f"v{i:03d}.mp4",
                "content_hash": f"{i:032x}",
                "size": 1,
                "mtime_ns": 1,
                "vector": v,
            }
            for i, v in enumerate(vectors)
        ]
    )
    store.refresh()
    return store


@pytest.mark.parametrize("index_type", Store.VECTOR_INDEX_TYPES)
def test_ann_shortlist_holds_no_vectors_and_matches_the_exact_one(tmp_path, index_type):
    store = _dot_store(tmp_path / "idx")
    model = _DotModel(np.random.default_rng(3).normal(size=(5, D_ANN)).astype(np.float32))
    texts = [str(i) for i in range(5)]
    exact = Index(store, model)
    assert not exact.approximate and not store.maybe_build_vector_index(min_rows=N_ANN + 1)
    want = exact.search(texts, top=5)

    store.build_vector_index(index_type=index_type, partitions=4, sub_vectors=4)
    assert store.has_vector_index()
    assert not store.maybe_build_vector_index(min_rows=N_ANN)  # built, nothing new
    ann = Index(Store.open(tmp_path / "idx"), model)
    assert ann.approximate and ann._vectors is None
    assert len(ann._background_vectors) == N_ANN  # the sample: every row of a small index
    # VECTOR_INDEX_NPROBES >= 4 lists: every list is searched; HNSW keeps 100 candidates
    # per list (about a list's rows); the 10 x 10 quantised candidates of the shortlist
    # (K 10) are re-scored with the stored vectors.
    assert Store.VECTOR_INDEX_NPROBES >= 4
    got = ann.search(texts, top=5)
    for g, w in zip(got, want):
        assert [h.video_id for h in g] == [h.video_id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=1e-6)
        np.testing.assert_allclose([h.confidence for h in g], [h.confidence for h in w], rtol=1e-6)
    # The index is what answers: one list of four (IVF_PQ trains one list at 400 rows: its
    # codes alone) without re-scoring misses some of the shortlist (an index LanceDB
    # cannot use, e.g. one built for l2 or cosine, makes it scan every row exactly
    # instead, and this would equal the full search).
    full = [store.nearest(q, 10) for q in model.queries]
    assert [store.nearest(q, 10, nprobes=1, refine_factor=0) for q in model.queries] != full
    hits = got[0]
    assert all(0.0 <= h.confidence <= 1.0 for h in hits)
    # Each hit's confidence maps its coarse standard score against the background.
    bg = exact._background_vectors @ model.queries[0]
    z = scoring.standard_scores(np.array([h.score for h in hits]), bg)
    np.testing.assert_allclose([h.confidence for h in hits], scoring.confidence(z), rtol=1e-5)
