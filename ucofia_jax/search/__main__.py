"""python -m ucofia_jax.search index | query | serve | export (docs/search.md).

User errors (a missing folder, not an index, another model, a bad file under --strict, a port
in use) print one line on stderr and exit with status 2; ``--verbose`` shows the traceback
instead, and the libraries' log lines that are hidden by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from ucofia_jax.errors import IndexingError, SearchIndexError, SourceError, UserError
from ucofia_jax.runtime import caches
from ucofia_jax.search.notice import training_notice

# This module imports only the standard library and ucofia_jax.errors at the top: `--help` and
# a misspelt path answer before jax, flax, orbax and lancedb are loaded (about 3 s together;
# docs/search.md, "Speed"). Each command imports what it needs inside its function.

# UserError: ucofia_jax/errors.py (a bad index, source, file or weights); OSError: a file the
# OS refuses (permission, missing, disk full).
USER_ERRORS = (UserError, OSError)
# The loggers that speak at INFO while a model loads or a file decodes; shown with --verbose.
CHATTY_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "tensorstore", "lancedb")
NO_GOOD_MATCH_LINE = "(no good match: best hit is at the collection's background level)"


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


def _source(a):
    """The ModelSource of the flags, or None (the index's own model)."""
    if not (a.workdir or a.ucofia_checkpoint or a.clip):
        if a.clip_only:
            raise SourceError("--clip_only needs --clip (the CLIP weights)")
        return None
    from ucofia_jax.search.source import ModelSource  # noqa: PLC0415 -- jax: see the top

    return ModelSource(
        workdir=a.workdir,
        ucofia_checkpoint=a.ucofia_checkpoint,
        clip=a.clip,
        config=a.config,
        clip_only=a.clip_only,
    )


def parser() -> argparse.ArgumentParser:
    """The command line. A flag whose default belongs to the library (top, shortlist, batch
    size, per-file hits, window, rows per shard) defaults to None here: only a value given on
    the command line is passed on, so each default lives in one place (the API's)."""
    p = argparse.ArgumentParser(prog="python -m ucofia_jax.search", description=__doc__)
    p.add_argument(
        "--verbose", action="store_true", help="tracebacks for errors, and the libraries' logs"
    )
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="index (incrementally) the videos under a folder")
    ix.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    ix.add_argument("--index", required=True, help="index directory (created)")
    _model_flags(ix, required=True)
    ix.add_argument("--workers", type=int, default=2, help="decode processes (0: in-process)")
    ix.add_argument("--batch_size", type=int, default=None, help="videos per encode")
    ix.add_argument("--strict", action="store_true", help="fail on the first bad file")
    ix.add_argument("--shortlist", type=int, default=None, help="default K of new indexes")
    ix.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds per moment of a long file (default: the model's max_frames / "
        "feature_framerate); a file no longer than this is one item",
    )
    ix.add_argument(
        "--stride", type=float, default=None, help="seconds between moments (default: window/2)"
    )
    ix.add_argument(
        "--follow_symlinks",
        action="store_true",
        help="index symlinks that lead outside --videos (skipped by default)",
    )
    ix.add_argument("--no_progress", action="store_true")

    q = sub.add_parser("query", help="rank the indexed videos for texts")
    q.add_argument("--index", required=True)
    q.add_argument("texts", nargs="*", help="query texts")
    q.add_argument("--queries", default="", help="a file of queries, one per line")
    q.add_argument("--top", type=int, default=None, help="hits per query (default: the API's)")
    q.add_argument("--shortlist", type=int, default=None, help="K (default: the index's)")
    q.add_argument(
        "--per_file", type=int, default=None, help="at most N moments of one file per query"
    )
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
    e.add_argument("--rows_per_shard", type=int, default=None)
    return p


def given(**flags: Any) -> Dict[str, Any]:
    """The flags that were given (not None): the keyword arguments to pass on."""
    return {k: v for k, v in flags.items() if v is not None}


def check_index_path(path: str) -> None:
    """A misspelt or wrong --index fails here, before jax and lancedb load (Store.open checks
    the tables themselves)."""
    if not os.path.exists(path):
        raise SearchIndexError(f"{path}: no such index (run `python -m ucofia_jax.search index`)")
    if not os.path.isdir(path):
        raise SearchIndexError(f"{path}: not a ucofia search index (a file, not a folder)")


def quiet_logs(verbose: bool) -> None:
    """Hides the libraries' chatter (TensorFlow's C++ start-up lines, absl, orbax: INFO, and
    warnings about their own internals, e.g. Orbax's "Metadata file does not exist" when the
    model loads) unless --verbose; their errors, and our own warnings, still show."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow's C++ loads
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _open(a):
    check_index_path(a.index)
    # jax and lancedb load here (see the top); Flax only with a model from flags, or where
    # the index's compiled query model cannot run (search/query_model.py).
    from ucofia_jax.search.index import Index  # noqa: PLC0415
    from ucofia_jax.search.store import Store  # noqa: PLC0415

    src = _source(a)
    if a.compile_cache:
        caches.enable_compilation_cache()
    if src is None:
        return Index.open(a.index)  # its own model, loaded on the first search
    from ucofia_jax.search import source as source_lib  # noqa: PLC0415

    Store.open(a.index)  # a path that is no index fails before a model loads
    return Index.open(a.index, model=source_lib.load_model(src))


def _queries(a) -> List[str]:
    texts = list(a.texts)
    if a.queries:
        with open(a.queries, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    if not texts:
        raise IndexingError("no query: give texts or --queries FILE")
    return texts


def notice_of(index) -> Optional[str]:
    """The warning a person should read before trusting hits (a model trained on the
    synthetic demo set), or None."""
    return training_notice(index.meta.get("source", {}))


def cmd_index(a) -> int:
    src = _source(a)
    if src is None:
        raise SourceError(
            "index needs a model: --workdir RUN, or --ucofia_checkpoint pytorch_model.bin "
            "--clip ViT-B-32.pt, or --clip ViT-B-32.pt --clip_only"
        )
    if not os.path.isdir(a.videos):
        raise IndexingError(f"{a.videos}: no such folder (--videos)")
    # jax, flax and lancedb load here (see the top).
    from ucofia_jax.runtime import distributed  # noqa: PLC0415
    from ucofia_jax.search import source as source_lib  # noqa: PLC0415
    from ucofia_jax.search.indexer import build_index  # noqa: PLC0415

    distributed.maybe_initialize(None)  # a launch.sh multi-process job: split the files
    if a.compile_cache:
        caches.enable_compilation_cache()
    model = source_lib.load_model(src)
    summary = build_index(
        a.videos,
        a.index,
        model,
        workers=a.workers,
        strict=a.strict,
        progress=not a.no_progress,
        **given(
            batch_size=a.batch_size,
            shortlist=a.shortlist,
            window=a.window,
            stride=a.stride,
            follow_symlinks=a.follow_symlinks or None,
        ),
    )
    prefix = f"[process {distributed.process_index()}] " if distributed.process_count() > 1 else ""
    for line in summary.lines():
        print(prefix + line, flush=True)
    notice = training_notice(src.absolute().to_dict())
    if notice:
        print(f"{prefix}note: {notice}", flush=True)
    return 0


def hit_record(hit) -> Dict[str, Any]:
    """One hit as --json writes it: the ``Hit`` fields (rank, score, confidence, path, start,
    end, duration, video_id)."""
    return dataclasses.asdict(hit)


def moment_text(start: Optional[float], end: Optional[float]) -> str:
    """`` [12.0-20.0 s]`` for a moment of a file, empty for a whole file."""
    if start is None:
        return ""
    return f" [{start:.1f}-{end:.1f} s]" if end is not None else f" [{start:.1f}- s]"


def hit_line(hit) -> str:
    """``rank  score  confidence  path [start-end s]``."""
    return (
        f"  {hit.rank:3d}  {hit.score:8.4f}  {hit.confidence:4.2f}  "
        f"{hit.path}{moment_text(hit.start, hit.end)}"
    )


def query_lines(text: str, hits, no_match: bool) -> List[str]:
    """The text output of one query."""
    lines = [f"query: {text}"]
    if no_match:
        lines.append(f"  {NO_GOOD_MATCH_LINE}")
    lines += [hit_line(h) for h in hits]
    return lines


def cmd_query(a) -> int:
    texts = _queries(a)
    index = _open(a)
    from ucofia_jax.search.index import no_good_match  # noqa: PLC0415 -- loaded by _open

    results = index.search(texts, **given(top=a.top, shortlist=a.shortlist, per_file=a.per_file))
    notice = notice_of(index)
    if a.json:
        out = [
            {
                "query": t,
                "no_good_match": bool(no_good_match(hits)),
                "hits": [hit_record(h) for h in hits],
            }
            for t, hits in zip(texts, results)
        ]
        print(json.dumps(out, indent=1))
    else:
        for t, hits in zip(texts, results):
            print("\n".join(query_lines(t, hits, no_good_match(hits))))
    if notice:  # on stderr: --json stays one JSON document
        print(f"note: {notice}", file=sys.stderr)
    return 0


def cmd_serve(a) -> int:
    index = _open(a)
    from ucofia_jax.search import web  # noqa: PLC0415 -- the page is only needed to serve

    try:
        web.serve(index, host=a.host, port=a.port, notice=notice_of(index))
    except web.ListenError as e:  # a port in use is the user's to change, as a bad path is
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(a) -> int:
    check_index_path(a.index)
    # lancedb loads here (see the top).
    from ucofia_jax.search import export as export_lib  # noqa: PLC0415
    from ucofia_jax.search.store import Store  # noqa: PLC0415

    manifest = export_lib.export(
        Store.open(a.index), a.out, **given(rows_per_shard=a.rows_per_shard)
    )
    print(export_lib.summary_line(manifest, a.out))
    return 0


COMMANDS = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve, "export": cmd_export}


def main(argv: Optional[List[str]] = None, compile_cache: bool = False) -> int:
    """Runs one command; the exit status. ``compile_cache``: keep compiled programs in JAX's
    persistent cache (runtime.caches.enable_compilation_cache), a setting of the whole process, so
    the program (``python -m``) turns it on and a caller in its own process (a test) chooses."""
    a = parser().parse_args(argv)
    a.compile_cache = compile_cache
    quiet_logs(a.verbose)
    try:
        return COMMANDS[a.command](a)
    except USER_ERRORS as e:
        if a.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; committed batches are kept: rerun to resume" if a.command == "index" else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130


def run_program(argv: Optional[List[str]] = None) -> None:
    """``python -m ucofia_jax.search``: ``main`` with the compilation cache, then exit. A
    ``query`` writes nothing, so once its output is flushed the process ends at once
    (``os._exit``): the interpreter's teardown (JAX's and LanceDB's exit handlers) would add
    about 0.4 s to every query (docs/search.md, "Speed"). Other commands exit normally."""
    argv = sys.argv[1:] if argv is None else list(argv)
    status = main(argv, compile_cache=True)
    if parser().parse_known_args(argv)[0].command == "query":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run_program()
