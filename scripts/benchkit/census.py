"""Where a worker's memory per open SSE stream goes: ``scripts/bench --census [STREAMS]``.

One gunicorn gevent worker (gunicorn.conf.py) runs ``forkproxy.app`` inside
``traced``, which starts tracemalloc in the worker and answers
``/_census/LABEL`` with a snapshot written to a file (nothing proxied). The
driver warms the worker with a round of streams, snapshots it idle, holds
STREAMS streams open (the bench's SSE upstream sends one event, then waits),
snapshots again and prints the difference per stream, by the line that
allocated and by object type, beside the RSS growth per stream.

tracemalloc counts what Python's allocators hand out (objects, buffers,
greenlets' saved stacks); RSS also has the allocators' own slack, so the
two are printed side by side. The figures are for reading, not for pass/fail.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

from scripts.benchkit.harness import LOAD_CPU, Process, Target, free_port, mem_kib, start_holder, wait_port

_FRAMES = 8


def _types() -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return dict(counts)


def traced(app):
    """``app`` with ``/_census/LABEL``: a tracemalloc snapshot and object counts, pickled to CENSUS_DIR."""
    tracemalloc.start(_FRAMES)
    directory = Path(os.environ["CENSUS_DIR"])

    def census_app(environ, start_response):
        path = environ["PATH_INFO"]
        if not path.startswith("/_census/"):
            return app(environ, start_response)
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        label = path.rsplit("/", 1)[1]
        with open(directory / f"{label}.pickle", "wb") as out:
            pickle.dump({"snapshot": snapshot, "types": _types()}, out)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    return census_app


def _app():
    if os.environ.get("CENSUS_APP") == "pool_floor":
        from scripts.benchkit.apps import pool_floor
        return traced(pool_floor)
    import forkproxy.app
    return traced(forkproxy.app.application)


def _snapshot(target: Target, directory: Path, label: str) -> dict:
    with urllib.request.urlopen(f"{target.url}/_census/{label}", timeout=60) as resp:
        resp.read()
    with open(directory / f"{label}.pickle", "rb") as f:
        return pickle.load(f)


def _hold(target: Target, count: int) -> subprocess.Popen:
    holder, opened = start_holder("sse", target, count, 600)
    if opened != count:
        holder.kill()
        raise RuntimeError(f"only {opened} of {count} streams opened")
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(30)


def report(idle: dict, held: dict, streams: int, rss_kib: float, top: int) -> None:
    diff = held["snapshot"].compare_to(idle["snapshot"], "traceback")
    total = sum(stat.size_diff for stat in diff)
    print(f"{streams} streams held: RSS +{rss_kib:.1f} KiB/stream; traced by tracemalloc "
          f"+{total / 1024 / streams:.2f} KiB/stream\n")
    print(f"top allocation sites, bytes per stream (innermost {_FRAMES} frames, innermost first):")
    for stat in diff[:top]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback)]
        print(f"  {stat.size_diff / streams:8.0f} B  {stat.count_diff / streams:5.1f} blocks  "
              + " < ".join(frames[:5]))
    print("\nbytes per stream by the package that allocated (innermost frame):")
    for package, size in _by_package(diff).most_common():
        print(f"  {size / streams:8.0f} B  {package}")
    grown = {name: held["types"].get(name, 0) - idle["types"].get(name, 0) for name in held["types"]}
    print("\nobjects tracked by the GC, per stream:")
    for name, n in sorted(grown.items(), key=lambda kv: -kv[1])[:top]:
        if n >= streams // 2:
            print(f"  {n / streams:5.2f}  {name}")


def _by_package(diff: list) -> collections.Counter:
    sizes: collections.Counter = collections.Counter()
    for stat in diff:
        path = stat.traceback[-1].filename
        parts = Path(path).parts
        package = next((p for p in ("forkproxy", "gunicorn", "gevent", "urllib3", "greenlet") if p in parts),
                       "python" if "site-packages" not in parts else parts[parts.index("site-packages") + 1])
        sizes[package] += stat.size_diff
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("streams", type=int, nargs="?", default=1000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--app", choices=("forkproxy", "pool_floor"), default="forkproxy",
                        help="pool_floor: the design's floor (scripts/benchkit/apps.py), for comparison")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-census-"))
    port = free_port()
    upstream = Process()
    upstream.spawn([sys.executable, "-m", "scripts.benchkit.sse", "serve", str(port)], LOAD_CPU)
    wait_port(port)
    target = Target("census", f"http://127.0.0.1:{port}", env={"CENSUS_DIR": str(directory), "CENSUS_APP": args.app})
    try:
        _release(_hold(target, args.streams))  # warm: pools, caches, the allocators' arenas
        time.sleep(1)
        idle = _snapshot(target, directory, "idle")
        before = mem_kib(target.pids())
        holder = _hold(target, args.streams)
        time.sleep(1)
        after = mem_kib(target.pids())
        held = _snapshot(target, directory, "held")
        _release(holder)
    finally:
        target.stop()
        upstream.stop()
    report(idle, held, args.streams, (after - before) / args.streams, args.top)
    for f in directory.iterdir():
        f.unlink()
    directory.rmdir()


app = _app() if os.environ.get("CENSUS_DIR") else None

if __name__ == "__main__":
    main()
