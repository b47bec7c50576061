"""The query model an index keeps (search/query_model.py): the text tower and head saved by
``index``, with the query's programs exported from the model's public methods. A query that
uses it must rank and score exactly as the model loaded from its source does."""

import json
import os
import shutil

import numpy as np
import pytest
from _search_fixtures import make_clips, save_workdir, search_config
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ucofia_jax.search import query_model
from ucofia_jax.search.index import Index
from ucofia_jax.search.indexer import build_index
from ucofia_jax.search.source import ModelSource, SearchModel, load_model

QUERIES = ["a red circle moves left", "a blue square", "zebra crossing at night"]


def trained(params):
    """A head whose coarse projections are not the identity they start as (a trained one's
    are not): then the shortlist query differs from the plain sentence feature."""
    rng = np.random.default_rng(0)
    head = dict(params["head"])
    for name in ("global_mat_weight", "global_mat_weight_1"):
        w = np.asarray(head[name])
        head[name] = (w + 0.5 * rng.standard_normal(w.shape) / np.sqrt(w.shape[0])).astype(w.dtype)
    return {**params, "head": head}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query_model")
    workdir = save_workdir(tmp / "run", search_config(noise_at_eval=True), edit_params=trained)
    captions = make_clips(tmp / "clips", 5)
    model = load_model(ModelSource(workdir=workdir))
    build_index(tmp / "clips", tmp / "idx", model, workers=0, progress=False, log=lambda s: None)
    shapes = Index.open(tmp / "idx").meta["shapes"]
    return {
        "index": tmp / "idx",
        "model": model,
        "captions": list(captions.values()),
        "shapes": shapes,
    }


def _hits(index: Index, texts):
    return [
        [(h.path, h.start, h.score, h.confidence) for h in hits]
        for hits in index.search(texts, top=len(index), shortlist=len(index))
    ]


def _assert_same_hits(got, want):
    for g, w in zip(got, want):
        assert [(p, s) for p, s, _, _ in g] == [(p, s) for p, s, _, _ in w]
        np.testing.assert_allclose([x[2] for x in g], [x[2] for x in w], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([x[3] for x in g], [x[3] for x in w], rtol=1e-5, atol=1e-5)


def test_index_saves_the_query_side_and_its_programs(made):
    path = query_model.path_in(made["index"])
    names = set(load_file(str(path)))
    assert not any(n.startswith("clip/visual/") for n in names)  # no vision tower
    assert {
        "clip/logit_scale",
        f"{query_model.PROGRAMS}/text",
        f"{query_model.PROGRAMS}/score",
    } <= names
    assert any(n.startswith("head/") for n in names) and any(
        n.startswith("clip/transformer/") for n in names
    )
    assert query_model.fingerprint_of_file(made["index"]) == made["model"].fingerprint
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_compiled_query_model_ranks_and_scores_as_the_source_model(made):
    texts = made["captions"][:3] + QUERIES
    compiled = Index.open(made["index"])
    assert isinstance(compiled.model, query_model.CompiledQueryModel)
    traced = Index.open(
        made["index"],
        model=query_model.load(
            made["index"], made["model"].fingerprint, made["shapes"], compiled=False
        ),
    )
    assert isinstance(traced.model, SearchModel) and traced.model.query_only
    source = Index.open(made["index"], model=made["model"])
    want = _hits(source, texts)
    _assert_same_hits(_hits(compiled, texts), want)
    _assert_same_hits(_hits(traced, texts), want)
    # Any shortlist size runs (the programs' video axis is symbolic), and several texts at once.
    k = _hits(compiled, texts)
    small = [
        [(h.path, h.start, h.score, h.confidence) for h in hits]
        for hits in compiled.search(texts, top=2, shortlist=2)
    ]
    assert [len(h) for h in small] == [2] * len(texts) and all(
        s[0][2] <= kk[0][2] + 1e-5 for s, kk in zip(small, k)
    )


def test_query_only_model_refuses_to_encode_videos(made):
    model = query_model.load(
        made["index"], made["model"].fingerprint, made["shapes"], compiled=False
    )
    with pytest.raises(Exception, match="cannot encode videos"):
        model.encode_frames(np.zeros((1, 2, 8, 8, 3), np.uint8), np.ones((1, 2)), np.zeros(1))


def _rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


def test_programs_of_another_jax_are_exported_again(made, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(made["index"], idx)
    programs = json.loads(_metadata(idx)["programs"])
    _rewrite_metadata(query_model.path_in(idx), programs=json.dumps({**programs, "jax": "0.0.1"}))
    first = query_model.load(idx, made["model"].fingerprint, made["shapes"])
    assert isinstance(first, SearchModel)  # traced, and the file written again for this JAX
    assert json.loads(_metadata(idx)["programs"])["jax"] == programs["jax"]
    assert isinstance(
        query_model.load(idx, made["model"].fingerprint, made["shapes"]),
        query_model.CompiledQueryModel,
    )
    _assert_same_hits(_hits(Index.open(idx), QUERIES), _hits(Index.open(made["index"]), QUERIES))


def test_a_file_of_another_model_or_damaged_is_ignored(made, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(made["index"], idx)
    assert query_model.load(idx, "another fingerprint", made["shapes"]) is None
    query_model.path_in(idx).write_bytes(b"not a safetensors file")
    assert query_model.load(idx, made["model"].fingerprint, made["shapes"]) is None
    index = Index.open(idx)  # loads the source, and saves the query model again
    assert isinstance(index.model, SearchModel) and not index.model.query_only
    assert query_model.fingerprint_of_file(idx) == made["model"].fingerprint
    _assert_same_hits(_hits(index, QUERIES), _hits(Index.open(made["index"]), QUERIES))


def _metadata(idx):
    with safe_open(str(query_model.path_in(idx)), framework="numpy") as f:
        return dict(f.metadata())
