"""python -m ucofia_jax.search index | query | serve | export (docs/search.md).

User errors (a missing folder, not an index, another model, a bad file under --strict) print
one line on stderr and exit with status 2; ``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

from ucofia_jax.errors import IndexingError, SourceError, UserError
from ucofia_jax.runtime import distributed
from ucofia_jax.search import export as export_lib
from ucofia_jax.search.index import DEFAULT_TOP, Index
from ucofia_jax.search.indexer import DEFAULT_BATCH, build_index
from ucofia_jax.search.source import ModelSource, load_model
from ucofia_jax.search.store import DEFAULT_SHORTLIST, Store

# UserError: ucofia_jax/errors.py (a bad index, source, file or weights); OSError: a file the
# OS refuses (permission, missing, disk full).
USER_ERRORS = (UserError, OSError)


def _model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group(
        "model" + ("" if required else " (default: the one the index was made with)")
    )
    g.add_argument("--workdir", default="", help="a training run's --workdir (its checkpoint)")
    g.add_argument("--ucofia_checkpoint", default="", help="released UCoFiA pytorch_model.bin")
    g.add_argument("--clip", default="", help="CLIP weights (OpenAI .pt / HF dir)")
    g.add_argument(
        "--config", default="", help="configs/*.py for --ucofia_checkpoint/--clip (msrvtt)"
    )
    g.add_argument(
        "--clip_only",
        action="store_true",
        help="score by mean-pooled CLIP frame features vs the sentence (no UCoFiA head)",
    )


def _source(a) -> Optional[ModelSource]:
    if not (a.workdir or a.ucofia_checkpoint or a.clip):
        if a.clip_only:
            raise SourceError("--clip_only needs --clip (the CLIP weights)")
        return None
    return ModelSource(
        workdir=a.workdir,
        ucofia_checkpoint=a.ucofia_checkpoint,
        clip=a.clip,
        config=a.config,
        clip_only=a.clip_only,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ucofia_jax.search", description=__doc__)
    p.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="index (incrementally) the videos under a folder")
    ix.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    ix.add_argument("--index", required=True, help="index directory (created)")
    _model_flags(ix, required=True)
    ix.add_argument("--workers", type=int, default=2, help="decode processes (0: in-process)")
    ix.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="videos per encode")
    ix.add_argument("--strict", action="store_true", help="fail on the first bad file")
    ix.add_argument(
        "--shortlist", type=int, default=DEFAULT_SHORTLIST, help="default K of new indexes"
    )
    ix.add_argument("--no_progress", action="store_true")

    q = sub.add_parser("query", help="rank the indexed videos for texts")
    q.add_argument("--index", required=True)
    q.add_argument("texts", nargs="*", help="query texts")
    q.add_argument("--queries", default="", help="a file of queries, one per line")
    q.add_argument("--top", type=int, default=DEFAULT_TOP)
    q.add_argument("--shortlist", type=int, default=None, help="K (default: the index's)")
    q.add_argument("--json", action="store_true", help="JSON output")
    _model_flags(q, required=False)

    s = sub.add_parser("serve", help="a local web page to search the index")
    s.add_argument("--index", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    _model_flags(s, required=False)

    e = sub.add_parser("export", help="write the stored features (safetensors + manifest)")
    e.add_argument("--index", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--rows_per_shard", type=int, default=export_lib.DEFAULT_ROWS_PER_SHARD)
    return p


def _open(a) -> Index:
    src = _source(a)
    Store.open(a.index)  # a path that is no index fails before a model loads
    model = load_model(src) if src is not None else None
    return Index.open(a.index, model=model)


def _queries(a) -> List[str]:
    texts = list(a.texts)
    if a.queries:
        with open(a.queries, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    if not texts:
        raise IndexingError("no query: give texts or --queries FILE")
    return texts


def cmd_index(a) -> int:
    src = _source(a)
    if src is None:
        raise SourceError(
            "index needs a model: --workdir RUN, or --ucofia_checkpoint pytorch_model.bin "
            "--clip ViT-B-32.pt, or --clip ViT-B-32.pt --clip_only"
        )
    if not os.path.isdir(a.videos):
        raise IndexingError(f"{a.videos}: no such folder (--videos)")
    distributed.maybe_initialize(None)  # a launch.sh multi-process job: split the files
    model = load_model(src)
    summary = build_index(
        a.videos,
        a.index,
        model,
        workers=a.workers,
        batch_size=a.batch_size,
        strict=a.strict,
        progress=not a.no_progress,
        shortlist=a.shortlist,
    )
    prefix = f"[process {distributed.process_index()}] " if distributed.process_count() > 1 else ""
    for line in summary.lines():
        print(prefix + line, flush=True)
    return 0


def cmd_query(a) -> int:
    texts = _queries(a)
    index = _open(a)
    results = index.search(texts, top=a.top, shortlist=a.shortlist)
    if a.json:
        out = [
            {"query": t, "hits": [dataclasses.asdict(h) for h in hits]}
            for t, hits in zip(texts, results)
        ]
        print(json.dumps(out, indent=1))
        return 0
    for t, hits in zip(texts, results):
        print(f"query: {t}")
        for h in hits:
            seg = f"  [{h.start:.1f}-{h.end:.1f} s]" if h.start is not None else ""
            print(f"  {h.rank:3d}  {h.score:8.4f}  {h.path}{seg}")
    return 0


def cmd_serve(a) -> int:
    index = _open(a)
    from ucofia_jax.search import web  # noqa: PLC0415 -- the page is only needed to serve

    web.serve(index, host=a.host, port=a.port)
    return 0


def cmd_export(a) -> int:
    manifest = export_lib.export(Store.open(a.index), a.out, rows_per_shard=a.rows_per_shard)
    print(export_lib.summary_line(manifest, a.out))
    return 0


COMMANDS = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve, "export": cmd_export}


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except USER_ERRORS as e:
        if a.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed batches are kept; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
