"""Upstream pools under load: ``scripts/bench --pools``.

Two figures, both through the real gunicorn (one gevent worker on CPU 0,
wrk and three static nginx upstreams on CPU 1):

- the CPU per small GET of forkproxy.app with a 3-member pool
  (``FORKPROXY_UPSTREAM`` listing three upstreams) against one URL,
  alternating the two for ``--repeat`` rounds;
- requests answered and failed while one of three members is killed
  under load: wrk runs ``--seconds``, and a third of the way in one upstream
  nginx is stopped (its open connections closed).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
from pathlib import Path

from scripts.benchkit.harness import Target, alternating_args, cpu_per_request, free_port, static_upstream, wrk


def upstreams(count: int) -> tuple[list, list[str], list[Path]]:
    started, urls, dirs = [], [], []
    for _ in range(count):
        html, port = Path(tempfile.mkdtemp(prefix="pools-")), free_port()
        started.append(static_upstream(port, html))
        urls.append(f"http://127.0.0.1:{port}")
        dirs.append(html)
    return started, urls, dirs


def cpu_per_small_get(upstream: str, secs: float) -> float:
    return cpu_per_small_get_of(Target("forkproxy", upstream), secs)


def cpu_per_small_get_of(target: Target, secs: float) -> float:
    """The target's CPU per small GET under 50 connections for ``secs`` (the target is stopped after)."""
    try:
        return cpu_per_request(target, "/b/small", secs)
    finally:
        target.stop()


def killed_member(urls: list[str], secs: float, victim) -> dict:
    target = Target("forkproxy", ",".join(urls))
    try:
        wrk(target.url + "/b/small", 50, 1)
        timer = threading.Timer(secs / 3, victim.stop)
        timer.start()
        result = wrk(target.url + "/b/small", 50, secs)
        timer.join()
        return result
    finally:
        target.stop()


def main() -> None:
    args = alternating_args(__doc__, 5)
    started, urls, dirs = upstreams(3)
    try:
        single, pooled = [], []
        for _ in range(args.repeat):
            single.append(cpu_per_small_get(urls[0], args.seconds))
            pooled.append(cpu_per_small_get(",".join(urls), args.seconds))
        one, three = statistics.median(single), statistics.median(pooled)
        print(f"CPU per small GET, one gevent worker, median of {args.repeat} alternating runs of {args.seconds:g} s:")
        print(f"  one URL          {one:7.1f} us   (runs: {', '.join(f'{v:.0f}' for v in single)})")
        print(f"  3-member pool    {three:7.1f} us   (runs: {', '.join(f'{v:.0f}' for v in pooled)})")
        print(f"  added by the pool: {three - one:+.1f} us ({(three - one) / one * 100:+.1f}%)")
        result = killed_member(urls, args.seconds * 2, started[1])
        print(f"One of three members stopped {args.seconds * 2 / 3:.1f} s into {args.seconds * 2:g} s of load "
              f"(50 connections): {result['requests']} answered, {result['errors']} failed "
              f"(non-2xx or socket errors), {result['rps']:.0f} req/s")
    finally:
        for up in started:
            up.stop()
        for html in dirs:
            shutil.rmtree(html, ignore_errors=True)


if __name__ == "__main__":
    main()
