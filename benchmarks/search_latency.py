"""How long a person waits for the search command line and page (issue 20, "answers in a
second"): wall time of whole processes, start-up included, as a user runs them.

    .venv/bin/python benchmarks/search_latency.py --index workdir/demo/videos.ucofia

Rows (each run --repeats times; the table gives the median, min and max wall seconds, and the
median CPU seconds of the process, user + system: on a shared machine the wall time waits for
other work, the CPU time much less):

* ``--help``: ``python -m ucofia_jax.search query --help``;
* ``bad path``: ``query`` on a misspelt index path (exit 2);
* ``query cold``: ``query`` with an empty compilation cache (a machine that never ran it);
* ``query warm``: ``query`` again, the cache filled by the cold run;
* ``serve first search``: ``serve`` started, the page's first ``/api/search`` request after
  "Model ready", timed from request to complete answer (cold and warm cache).

The compilation cache goes to a fresh temporary folder (UCOFIA_COMPILE_CACHE), so "cold" is
cold whatever the user's own cache holds. Targets (docs/search.md): --help and bad path
<= 1 s, query warm <= 2 s, serve first search <= 1 s.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]


def environment(cache: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["UCOFIA_COMPILE_CACHE"] = cache
    return env


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(argv: list, env: dict, expect: int) -> tuple:
    """(wall seconds, CPU seconds) of one run of ``argv``, which must exit with ``expect``."""
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    res = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    if res.returncode != expect:
        raise SystemExit(f"{' '.join(argv)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return wall, cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_first_search(cli: list, index: str, text: str, env: dict) -> tuple:
    """(seconds from sending the first search after "Model ready" to its complete answer,
    None: the server's CPU time is not this request's)."""
    port = free_port()
    proc = subprocess.Popen(
        [*cli, "serve", "--index", index, "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("serve exited before 'Model ready'")
            if line.startswith("Model ready"):
                break
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        t0 = time.perf_counter()
        conn.request("GET", f"/api/search?q={quote(text)}&top=20")
        resp = conn.getresponse()
        resp.read()
        wall = time.perf_counter() - t0
        if resp.status != 200:
            raise SystemExit(f"serve: /api/search answered {resp.status}")
        return wall, None
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--index", default="workdir/demo/videos.ucofia", help="a search index")
    p.add_argument("--query", default="a red circle moves left", help="the query text")
    p.add_argument("--repeats", type=int, default=3, help="runs per row")
    a = p.parse_args()
    index = str(Path(a.index).resolve())
    if not Path(index).is_dir():
        raise SystemExit(f"error: {a.index}: no such index (build it: README, Search)")
    cli = [sys.executable, "-m", "ucofia_jax.search"]
    query = [*cli, "query", "--index", index, a.query]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        no_cache = environment("off")
        rows.append(
            (
                "--help",
                "-",
                [timed_run([*cli, "query", "--help"], no_cache, 0) for _ in range(a.repeats)],
            )
        )
        bad = [*cli, "query", "--index", index + ".misspelt", a.query]
        rows.append(("bad path", "-", [timed_run(bad, no_cache, 2) for _ in range(a.repeats)]))
        cold = []
        for i in range(a.repeats):  # each cold run gets its own empty cache
            cold.append(timed_run(query, environment(os.path.join(tmp, f"cold{i}")), 0))
        rows.append(("query", "cold", cold))
        warm_env = environment(os.path.join(tmp, "cold0"))
        rows.append(("query", "warm", [timed_run(query, warm_env, 0) for _ in range(a.repeats)]))
        serve_cold = [
            serve_first_search(cli, index, a.query, environment(os.path.join(tmp, f"s{i}")))
            for i in range(a.repeats)
        ]
        rows.append(("serve first search", "cold", serve_cold))
        serve_warm = [serve_first_search(cli, index, a.query, warm_env) for _ in range(a.repeats)]
        rows.append(("serve first search", "warm", serve_warm))
    print(f"index {a.index}, query {a.query!r}, {a.repeats} runs per row, {os.cpu_count()} CPUs")
    print(f"| {'what':<20} | {'cache':<5} | median s | min s | max s | CPU s |")
    print(f"|{'-' * 22}|{'-' * 7}|---------:|------:|------:|------:|")
    for what, cache, runs in rows:
        walls = [w for w, _ in runs]
        cpus = [c for _, c in runs if c is not None]
        cpu = f"{statistics.median(cpus):5.2f}" if cpus else "    -"
        print(
            f"| {what:<20} | {cache:<5} | {statistics.median(walls):8.2f} | "
            f"{min(walls):5.2f} | {max(walls):5.2f} | {cpu} |"
        )


if __name__ == "__main__":
    main()
