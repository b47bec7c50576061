"""The local web page of ``python -m ucofia_jax.search serve``: a search box over one index.

Standard library only (``http.server``): no web framework to install or keep pinned. The
index is duck-typed (``root``, ``search``, ``thumbnail``, ``describe``, ``len``), so this
module imports nothing else of ours.

Routes (GET and HEAD):

    /                        the page (static/index.html; it loads static/app.js, style.css,
                             favicon.svg)
    /static/<name>           one of those files, nothing else
    /api/search?q=...&top=N  JSON {query, top, count, latency_ms, results: [hit, ...]}, a hit
                             being the index's Hit (rank, score, path, start, end, video_id)
                             plus thumb_url and video_url (with a ``#t=start,end`` media
                             fragment for segments); a bad request is a 400 JSON error
    /api/info                JSON {root, count, description: index.describe(), limits}
    /thumb/<relpath>         the JPEG of ``index.thumbnail(relpath)``
    /video/<relpath>         the video file; honours ``Range: bytes=`` (206 + Content-Range),
                             which browsers need to seek and to read an mp4's index at its end

What may be served: the static files named in STATIC_TYPES, and files under ``index.root``
that the index contains. A path must be plain and relative (no ``.``/``..``/empty segments,
not absolute, checked after percent-decoding, so ``%2e%2e`` and ``%2f`` are caught) -> else
403; it must be in the index -> else 404; and with symlinks resolved it must still lie under
the root -> else 403. Bound to 127.0.0.1 by default; while bound to a loopback address, a request
whose Host header names another host is refused (403), so a web page that rebinds its own
DNS name to 127.0.0.1 cannot read the user's videos through this server.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
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
    """The URL of a file's thumbnail (kind 'thumb') or video (kind 'video')."""
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
        "path": hit.path,
        "start": start,
        "end": end,
        "video_id": hit.video_id,
        "thumb_url": url_for("thumb", hit.path),
        "video_url": url_for("video", hit.path) + media_fragment(start, end),
    }


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
    """The HTTP server of one index: the handler reaches the index through ``self.server``."""

    daemon_threads = True

    def __init__(self, index, host: str, port: int):
        self.index = index
        self.root = Path(index.root).resolve()
        # The index may not be safe to call from several threads at once (a model, a store
        # connection): the server's threads take turns; file streaming runs outside it.
        self.index_lock = threading.Lock()
        self.allowed_hosts = _allowed_host_names(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), port), SearchHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening everywhere: this machine's own address
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def contains(self, rel: str) -> bool:
        """Is `rel` one of the index's videos? (`in` when the index has it, else thumbnail)."""
        with self.index_lock:
            if hasattr(self.index, "__contains__"):
                return bool(rel in self.index)
            return self.index.thumbnail(rel) is not None


class SearchHandler(BaseHTTPRequestHandler):
    """Dispatches the routes of the module doc; every refusal is a JSON ``{"error": ...}``."""

    server: SearchServer
    server_version = "ucofia-search/1"
    # Keep-alive: a results page fetches dozens of thumbnails. Every response sends a length.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

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
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (it often does, mid-video)
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

    def _send_json(self, status: int, payload: dict):
        body = json.dumps(payload, default=str, allow_nan=False).encode("utf-8")
        self._send_bytes(
            status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"}
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
        results = [hit_json(h) for h in hits]
        self._send_json(
            200,
            {
                "query": text,
                "top": top,
                "count": len(results),
                "latency_ms": latency_ms,
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
                "limits": {
                    "default_top": DEFAULT_TOP,
                    "max_top": MAX_TOP,
                    "max_query_chars": MAX_QUERY_CHARS,
                },
            },
        )

    def _thumb(self, url_tail: str):
        rel = relative_path(url_tail)
        with self.server.index_lock:
            jpeg = self.server.index.thumbnail(rel)
        if jpeg is None:
            raise HTTPError(404, f"no thumbnail for {rel[:200]!r}: not in the index")
        self._send_bytes(200, bytes(jpeg), "image/jpeg", {"Cache-Control": "private, max-age=60"})

    def _video(self, url_tail: str):
        rel = relative_path(url_tail)
        if not self.server.contains(rel):
            raise HTTPError(404, f"{rel[:200]!r} is not in the index")
        root = self.server.root
        path = (root / rel).resolve()  # follows symlinks: where the bytes really are
        if not path.is_relative_to(root):
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


def make_server(index, host: str = "127.0.0.1", port: int = 8080) -> SearchServer:
    """A ThreadingHTTPServer for `index`, bound (port 0: any free port) but not yet serving."""
    return SearchServer(index, host, port)


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


def serve(index, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serves the page until Ctrl-C (or SIGTERM), then closes the socket and returns.

    The model is loaded in the background meanwhile (a first query waits for it).
    """
    try:
        server = make_server(index, host, port)
    except OSError as e:
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a service manager, a test) ends like Ctrl-C: the socket is closed cleanly.
        def _interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"Search over {len(index)} videos under {server.root}", flush=True)
        print(f"Serving on {server.url}  (Ctrl-C to stop)", flush=True)
        if server.allowed_hosts is None:
            print(f"Warning: listening on {host}, not only this machine", file=sys.stderr)
        if len(index):
            threading.Thread(target=_warm_up, args=(server,), daemon=True).start()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
