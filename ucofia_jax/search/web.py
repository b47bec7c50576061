"""The local web page of ``python -m ucofia_jax.search serve``: a search box over one index.

Standard library only (``http.server``): no web framework to install or keep pinned. The
index is duck-typed (``root``, ``search``, ``thumbnail``, ``describe``, ``len``), so this
module imports nothing else of ours.

Routes (GET and HEAD; any other method is a JSON 405 with ``Allow: GET, HEAD``):

    /                        the page (static/index.html; it loads static/app.js, style.css,
                             favicon.svg)
    /static/<name>           one of those files, nothing else
    /api/search?q=...&top=N  JSON {query, top, count, latency_ms, no_good_match, results:
                             [hit, ...]}, a hit being the index's Hit (rank, score, confidence,
                             path, start, end, duration, video_id) plus thumb_url and video_url
                             (with a ``#t=start,end`` media fragment for a moment); a bad
                             request is a 400 JSON error
    /api/info                JSON {root, count, description: index.describe(), notice, limits}
    /thumb/<video_id>        the frame strip (JPEG) the store holds for that row
                             (``index.thumbnail(video_id)``)
    /video/<relpath>         the video file; honours ``Range: bytes=`` (206 + Content-Range),
                             which browsers need to seek and to read an mp4's index at its end

What may be served: the static files named in STATIC_TYPES, and what the index holds for
files under ``index.root``. A path must be plain and relative (no ``.``/``..``/empty segments,
not absolute, checked after percent-decoding, so ``%2e%2e`` and ``%2f`` are caught) -> else
403; it must be in the index -> else 404; and with symlinks resolved it must still lie under
the root -> else 403. A thumbnail is served only for a row this server has returned in a
search (so its path is known) and whose file passes the same root check: no route serves
anything made from a file outside the root, even one indexed with ``--follow_symlinks``.
Bound to 127.0.0.1 by default; while bound to a loopback address, a request whose Host header
names another host is refused (403), so a web page that rebinds its own DNS name to 127.0.0.1
cannot read the user's videos through this server.

Shutdown (Ctrl-C, SIGTERM) stops accepting, closes every open connection (a client that sent
half a request is not waited for), waits for the threads that are still answering and for the
warm-up search, then returns: no thread is left inside the model when the interpreter exits.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

STATIC_DIR = Path(__file__).resolve().with_name("static")
# The only static files served (a whitelist: no path from the URL reaches the filesystem).
STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
    ".mov": "video/quicktime",
}
DEFAULT_TOP = 20
MAX_TOP = 200
MAX_QUERY_CHARS = 1000
CHUNK_BYTES = 256 * 1024
# The page loads its script and style from files (no inline code), so the policy can forbid
# everything else: even a path that slipped into markup could not run as a script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
ALLOWED_METHODS = ("GET", "HEAD")
# A row key (store.py: hex of a hash); anything else in /thumb/ is refused before a lookup.
VIDEO_ID = re.compile(r"[0-9a-f]{1,64}")
# A client that opened a connection and sends nothing is dropped after this many seconds.
IDLE_TIMEOUT_S = 30.0
# How long shutdown waits for the threads still answering (a search, a video chunk) and for
# the warm-up search: a search on the demo takes well under a second, a first one compiles.
SHUTDOWN_WAIT_S = 60.0


class ListenError(Exception):
    """The server cannot listen where asked (the port is taken, the address is not ours)."""


class HTTPError(Exception):
    """A request the server refuses: the status and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


class RangeNotSatisfiable(Exception):
    """A well-formed ``Range`` that asks for bytes the file does not have (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range`` header -> (first, last) byte, inclusive; None to send the whole file.

    One ``bytes=`` range only: ``a-b``, ``a-`` or the suffix ``-n``. A header we do not
    understand (another unit, several ranges, bad syntax) is ignored, as RFC 9110 allows,
    and the whole file is sent. Raises RangeNotSatisfiable when the range starts past the
    end (or asks for a zero-length suffix).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or not (first_text or last_text):
        return None
    if (first_text and not first_text.isdigit()) or (last_text and not last_text.isdigit()):
        return None
    if not first_text:  # suffix: the last n bytes
        n = int(last_text)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid syntax: ignored
    if first >= size:
        raise RangeNotSatisfiable(header)
    return first, min(last, size - 1)


def relative_path(url_tail: str) -> str:
    """The URL path after ``/video/`` or ``/thumb/`` -> the POSIX relative path it names.

    Percent-decodes once, then refuses (HTTPError 403) anything that is not a plain relative
    path: absolute, empty/``.``/``..`` segments, a Windows drive or backslash on Windows.
    """
    try:
        rel = unquote(url_tail, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the path is not valid UTF-8 after percent-decoding") from None
    if not rel:
        raise HTTPError(404, "no path given")
    if "\x00" in rel:
        raise HTTPError(400, "the path contains a NUL byte")
    if rel.startswith("/") or (os.name == "nt" and ("\\" in rel or ":" in rel)):
        raise HTTPError(403, "absolute paths are refused: give a path relative to the index")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise HTTPError(403, "'.', '..' and empty path segments are refused")
    return rel


def url_for(kind: str, rel: str) -> str:
    """The URL of a row's frame strip (kind 'thumb', ``rel`` its video_id) or of a file
    (kind 'video', ``rel`` its path)."""
    return f"/{kind}/{quote(rel, safe='/')}"


def media_fragment(start: float | None, end: float | None) -> str:
    """``#t=start,end`` (W3C media fragment): the browser plays only that part of the file."""
    if start is None:
        return ""
    text = f"#t={start:.3f}"
    return text + (f",{end:.3f}" if end is not None else "")


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def hit_json(hit) -> dict:
    """One Hit as the page receives it (NaN/inf become null: JSON has no such numbers)."""
    start, end = _finite_or_none(hit.start), _finite_or_none(hit.end)
    return {
        "rank": int(hit.rank),
        "score": _finite_or_none(hit.score),
        "confidence": _finite_or_none(hit.confidence),
        "path": hit.path,
        "start": start,
        "end": end,
        "duration": _finite_or_none(hit.duration),
        "video_id": hit.video_id,
        "thumb_url": url_for("thumb", hit.video_id),
        "video_url": url_for("video", hit.path) + media_fragment(start, end),
    }


def no_hits(hits) -> bool:
    """The page's "no good match" rule when the index gives none: only an empty list."""
    return not hits


def _allowed_host_names(host: str) -> frozenset | None:
    """Host-header names accepted while bound to `host`; None (any) off loopback."""
    name = host.strip("[]").lower()
    if name == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(name).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        return None
    own = f"[{name}]" if ":" in name else name
    return LOOPBACK_NAMES | {own}


class SearchServer(ThreadingHTTPServer):
    """The HTTP server of one index: the handler reaches the index through ``self.server``.

    ``no_good_match(hits) -> bool`` says when a query's best hit is at the collection's
    background level (the index module's rule; default: no hits at all); ``notice`` is a
    line the page shows above everything (e.g. a model trained on the synthetic demo set).
    """

    daemon_threads = True

    def __init__(self, index, host: str, port: int, *, no_good_match=None, notice=None):
        self.index = index
        self.root = Path(index.root).resolve()
        self.no_good_match = no_good_match or no_hits
        self.notice = notice
        # The index may not be safe to call from several threads at once (a model, a store
        # connection): the server's threads take turns; file streaming runs outside it.
        self.index_lock = threading.Lock()
        # video_id -> path of every row a search has returned: /thumb/ serves only those,
        # after the root check of their file.
        self.shown_paths: dict[str, str] = {}
        # The open connections and their threads: shutdown closes the first, joins the second.
        self._open_lock = threading.Lock()
        self._open: dict[threading.Thread, socket.socket] = {}
        self.allowed_hosts = _allowed_host_names(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), port), SearchHandler)

    def process_request_thread(self, request, client_address):
        me = threading.current_thread()
        with self._open_lock:
            self._open[me] = request
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(me, None)

    def close_connections(self, wait_s: float = SHUTDOWN_WAIT_S) -> int:
        """Shuts the reading side of every open connection and waits up to ``wait_s`` for
        their threads; returns how many were still running after that. A thread waiting for
        (the rest of) a request reads the end at once; one answering a request still sends its
        answer, then reads the end."""
        with self._open_lock:
            open_now = dict(self._open)
        for conn in open_now.values():
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by its thread
                pass
        deadline = time.monotonic() + wait_s
        for thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in open_now)

    def inside_root(self, rel: str) -> Path | None:
        """The file ``rel`` names, symlinks resolved, if it lies under the root; else None."""
        path = (self.root / rel).resolve()
        return path if path.is_relative_to(self.root) else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening everywhere: this machine's own address
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def contains(self, rel: str) -> bool:
        """Is `rel` (a relative path) one of the index's files?"""
        with self.index_lock:
            return bool(self.index.contains_path(rel))


class SearchHandler(BaseHTTPRequestHandler):
    """Dispatches the routes of the module doc; every refusal is a JSON ``{"error": ...}``."""

    server: SearchServer
    server_version = "ucofia-search/1"
    # Keep-alive: a results page fetches dozens of thumbnails. Every response sends a length.
    protocol_version = "HTTP/1.1"

    timeout = IDLE_TIMEOUT_S  # socket timeout: an idle or half-sent request is dropped

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def __getattr__(self, name: str):
        # http.server looks up do_<METHOD>; every method but GET and HEAD (POST, PUT, DELETE,
        # an invented one) gets the JSON 405 rather than the standard library's HTML 501.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self):
        self._responded = False
        self.close_connection = True  # a request body we do not read must not be parsed next
        self._send_json(
            405,
            {"error": f"method {self.command[:20]} not allowed: use GET or HEAD", "status": 405},
            {"Allow": ", ".join(ALLOWED_METHODS), "Connection": "close"},
        )

    def send_error(self, code, message=None, explain=None):
        # The standard library's own refusals (a malformed request line, headers too long)
        # as JSON like ours; it calls this before a handler runs.
        self._responded = False
        self.close_connection = True
        try:
            self._send_json(
                int(code),
                {"error": message or HTTPStatus(code).phrase, "status": int(code)},
                {"Connection": "close"},
            )
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    # -- plumbing -------------------------------------------------------------------------

    def _dispatch(self):
        self._responded = False
        try:
            self._check_host()
            path, _, query = self.path.partition("?")
            path = path.partition("#")[0]
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/") :])
            elif path == "/api/search":
                self._search(query)
            elif path == "/api/info":
                self._info()
            elif path.startswith("/thumb/"):
                self._thumb(path[len("/thumb/") :])
            elif path.startswith("/video/"):
                self._video(path[len("/video/") :])
            else:
                raise HTTPError(404, f"no such page: {path[:200]}")
        except HTTPError as e:
            self._send_error_json(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The browser went away (it often does, mid-video) or stopped reading for
            # IDLE_TIMEOUT_S: nothing more can be sent on this connection.
            self.close_connection = True
        except Exception as e:  # a bug or a failing index must not stop the server
            self.log_error("%s", traceback.format_exc())
            self._send_error_json(500, f"{type(e).__name__}: {e}")

    def _check_host(self):
        allowed = self.server.allowed_hosts
        header = self.headers.get("Host")
        if allowed is None or header is None:
            return
        header = header.strip().lower()
        if header.startswith("["):
            name = header[: header.find("]") + 1]
        else:
            name = header.partition(":")[0]
        if name not in allowed:
            raise HTTPError(
                403, f"Host {header[:100]!r} refused: this server answers only to localhost"
            )

    def _start(self, status: int, content_type: str, length: int, headers: dict | None = None):
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers=None):
        self._start(status, content_type, len(body), headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None):
        body = json.dumps(payload, default=str, allow_nan=False).encode("utf-8")
        self._send_bytes(
            status,
            body,
            "application/json; charset=utf-8",
            {"Cache-Control": "no-store", **(headers or {})},
        )

    def _send_error_json(self, status: int, message: str):
        if self._responded:  # headers already out: all we can do is drop the connection
            self.close_connection = True
            return
        self._send_json(status, {"error": message, "status": status})

    def log_request(self, code="-", size="-"):
        # Quiet when things work (a page is dozens of requests); refusals are logged.
        if isinstance(code, HTTPStatus):
            code = code.value
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)

    # -- routes ---------------------------------------------------------------------------

    def _static(self, name: str):
        if name not in STATIC_TYPES:
            raise HTTPError(404, f"no such static file: {name[:200]}")
        body = (STATIC_DIR / name).read_bytes()
        self._send_bytes(200, body, STATIC_TYPES[name], {"Cache-Control": "no-cache"})

    def _search(self, query: str):
        try:
            params = parse_qs(query, keep_blank_values=True, errors="strict", max_num_fields=8)
        except (UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"bad query string: {e}") from None
        text = (params.get("q") or [""])[0].strip()
        if not text:
            raise HTTPError(400, "empty query: give some text, e.g. /api/search?q=a+dog&top=10")
        if len(text) > MAX_QUERY_CHARS:
            raise HTTPError(400, f"query too long: {len(text)} > {MAX_QUERY_CHARS} characters")
        top_text = (params.get("top") or [str(DEFAULT_TOP)])[0].strip()
        try:
            top = int(top_text)
        except ValueError:
            raise HTTPError(400, f"top must be an integer, got {top_text[:50]!r}") from None
        if not 1 <= top <= MAX_TOP:
            raise HTTPError(400, f"top must be in [1, {MAX_TOP}], got {top}")
        with self.server.index_lock:
            t0 = time.perf_counter()
            try:
                hits = self.server.index.search([text], top)[0]
            except ValueError as e:  # the index judged the query itself bad
                raise HTTPError(400, f"query refused by the index: {e}") from None
            latency_ms = (time.perf_counter() - t0) * 1e3
            self.server.shown_paths.update((h.video_id, h.path) for h in hits)
        results = [hit_json(h) for h in hits]
        self._send_json(
            200,
            {
                "query": text,
                "top": top,
                "count": len(results),
                "latency_ms": latency_ms,
                "no_good_match": bool(self.server.no_good_match(hits)),
                "results": results,
            },
        )

    def _info(self):
        with self.server.index_lock:
            description = self.server.index.describe()
            count = len(self.server.index)
        self._send_json(
            200,
            {
                "root": str(self.server.root),
                "count": count,
                "description": description,
                "notice": self.server.notice,
                "limits": {
                    "default_top": DEFAULT_TOP,
                    "max_top": MAX_TOP,
                    "max_query_chars": MAX_QUERY_CHARS,
                },
            },
        )

    def _thumb(self, url_tail: str):
        video_id = url_tail
        if not VIDEO_ID.fullmatch(video_id):
            raise HTTPError(404, f"{video_id[:80]!r} is no row key (hex, as in a hit's video_id)")
        with self.server.index_lock:
            rel = self.server.shown_paths.get(video_id)
            if rel is None:
                raise HTTPError(404, f"no thumbnail for {video_id}: no search returned it")
            if self.server.inside_root(rel) is None:
                raise HTTPError(403, f"{rel[:200]!r} leads outside the indexed folder")
            jpeg = self.server.index.thumbnail(video_id)
        if jpeg is None:
            raise HTTPError(404, f"no thumbnail for {video_id}: not in the index")
        self._send_bytes(200, bytes(jpeg), "image/jpeg", {"Cache-Control": "private, max-age=60"})

    def _video(self, url_tail: str):
        rel = relative_path(url_tail)
        if not self.server.contains(rel):
            raise HTTPError(404, f"{rel[:200]!r} is not in the index")
        path = self.server.inside_root(rel)  # follows symlinks: where the bytes really are
        if path is None:
            raise HTTPError(403, f"{rel[:200]!r} leads outside the indexed folder")
        try:
            f = open(path, "rb")  # closed by the `with f` below
        except FileNotFoundError:
            raise HTTPError(404, f"{rel[:200]!r} is in the index but no longer on disk") from None
        except IsADirectoryError:
            raise HTTPError(404, f"{rel[:200]!r} is not a file") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            content_type = VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream")
            headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=60"}
            try:
                byte_range = parse_range(self.headers.get("Range"), size)
            except RangeNotSatisfiable:
                self._send_bytes(
                    416,
                    b"",
                    "text/plain",
                    {**headers, "Content-Range": f"bytes */{size}"},
                )
                return
            if byte_range is None:
                first, last, status = 0, size - 1, 200
            else:
                (first, last), status = byte_range, 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            self._start(status, content_type, last - first + 1, headers)
            if self.command == "HEAD":
                return
            f.seek(first)
            remaining = last - first + 1
            while remaining > 0:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:  # the file shrank while we sent it: the length is now a lie
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                remaining -= len(chunk)


def make_server(
    index, host: str = "127.0.0.1", port: int = 8080, *, no_good_match=None, notice=None
) -> SearchServer:
    """A ThreadingHTTPServer for `index`, bound (port 0: any free port) but not yet serving.
    Raises ListenError (one line) when it cannot listen there."""
    try:
        return SearchServer(index, host, port, no_good_match=no_good_match, notice=notice)
    except OSError as e:
        why = e.strerror or str(e)
        raise ListenError(
            f"cannot listen on {host}:{port}: {why}" + (" (try another --port)" if port else "")
        ) from None


def _warm_up(server: SearchServer) -> None:
    """One search now, so that the model loads (and compiles) before the first query."""
    t0 = time.perf_counter()
    try:
        with server.index_lock:
            server.index.search(["warm up"], DEFAULT_TOP)  # the page's default request
    except Exception as e:  # the page's queries will report it; the server keeps running
        print(f"Warning: the warm-up search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    print(f"Model ready ({time.perf_counter() - t0:.1f} s)", flush=True)


def serve(
    index, host: str = "127.0.0.1", port: int = 8080, *, no_good_match=None, notice=None
) -> None:
    """Serves the page until Ctrl-C or SIGTERM, then shuts down as the module doc says and
    returns. The model is loaded in the background meanwhile (a first query waits for it).
    Raises ListenError when the address cannot be used."""
    server = make_server(index, host, port, no_good_match=no_good_match, notice=notice)
    stopping = threading.Event()

    def _stop(signum, frame):
        # serve_forever() returns once shutdown() is called from another thread; the signal
        # handler itself must not block (it runs on the thread that serves).
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    warm_up = None
    try:
        print(f"Search over {len(index)} items under {server.root}", flush=True)
        if notice:
            print(f"Note: {notice}", flush=True)
        print(f"Serving on {server.url}  (Ctrl-C to stop)", flush=True)
        if server.allowed_hosts is None:
            print(f"Warning: listening on {host}, not only this machine", file=sys.stderr)
        if len(index):
            warm_up = threading.Thread(target=_warm_up, args=(server,), daemon=True)
            warm_up.start()
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # no new connections
        left = server.close_connections()
        if warm_up is not None:
            warm_up.join(SHUTDOWN_WAIT_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        print(f"Warning: {left} connection(s) still busy at shutdown", file=sys.stderr)
    print("Stopped.", flush=True)
