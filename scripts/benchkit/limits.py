"""Rate limits under load: ``scripts/bench --limits``.

Through the real gunicorn (one gevent worker on CPU 0; wrk, the static nginx
upstream and redis-server on CPU 1), small GETs with 50 connections:

- the CPU per request of one Proxy without limits, with one limit in the
  ``local`` store (in /dev/shm, as ``local`` is), and with one limit in Redis, alternating for ``--repeat``
  rounds; beside them, the round trip of one EVALSHA of the limits script
  measured from a plain client (what a request waits for Redis);
- requests/s with two workers sharing one limit set above the load, local and
  Redis, beside two workers without limits.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from forkproxy.limits.paths import default_path
from scripts.benchkit.pools import cpu_per_small_get_of
from scripts.benchkit.harness import (LOAD_CPU, Target, alternating_args, free_port, pin, remove_lmdb, static_upstream,
                                      wrk)


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(pin(LOAD_CPU) + ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def script_round_trip_us(url: str, count: int = 2000) -> float:
    """Median wall time of the store's one call (EVALSHA of the limits script), from a plain client."""
    from forkproxy import Limit
    from forkproxy.limits.redis_store import RedisStore

    store, limit = RedisStore(url, 1.0), Limit("rpm:probe", rate=1e9, per=60)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        store.take([limit])
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def main() -> None:
    args = alternating_args(__doc__, 5, ("nginx", "wrk", "redis-server"))
    html = Path(tempfile.mkdtemp(prefix="limits-"))
    port = free_port()
    upstream, url = static_upstream(port, html), f"http://127.0.0.1:{port}"
    redis, redis_url = start_redis()
    local = f"local:{Path(default_path()).parent / f'forkproxy-bench-{os.getpid()}.lmdb'}"  # /dev/shm as `local`
    variants = {"no limit": ("forkproxy+limit", {}),
                "one limit, local": ("forkproxy+limit", {"BENCH_LIMITS_STORE": local}),
                "one limit, Redis": ("forkproxy+limit", {"BENCH_LIMITS_STORE": redis_url})}
    try:
        cpu = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, (app, env) in variants.items():
                cpu[name].append(cpu_per_small_get_of(Target(app, url, env=env), args.seconds))
        base = statistics.median(cpu["no limit"])
        print(f"CPU per small GET, one gevent worker, median of {args.repeat} alternating runs of {args.seconds:g} s:")
        for name, runs in cpu.items():
            median = statistics.median(runs)
            print(f"  {name:18} {median:7.1f} us  {median - base:+6.1f} us ({(median - base) / base * 100:+5.1f}%)"
                  f"   (runs: {', '.join(f'{v:.0f}' for v in runs)})")
        print(f"  one EVALSHA round trip from a plain client: {script_round_trip_us(redis_url):.1f} us (median)")
        print(f"Two workers, 50 connections, {args.seconds:g} s:")
        for name, (app, env) in variants.items():
            target = Target(app, url, workers=2, env=env)
            try:
                wrk(target.url + "/b/small", 50, 1)
                result = wrk(target.url + "/b/small", 50, args.seconds)
            finally:
                target.stop()
            print(f"  {name:18} {result['rps']:8.0f} req/s  p99 {result['p99_ms']:.2f} ms  errors {result['errors']}")
    finally:
        redis.kill()
        redis.wait()
        upstream.stop()
        shutil.rmtree(html, ignore_errors=True)
        remove_lmdb(local[len("local:"):])


if __name__ == "__main__":
    main()
