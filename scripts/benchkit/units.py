"""The cost of one streamed unit: ``scripts/bench --units [--rounds N] [--targets ...]``.

Per unit: proxy CPU of a stream of ``--events`` events less that of a
1-event stream, over the events in between, from the proxy's /proc ticks
(32 concurrent streams, one event per upstream read, 5 ms apart, as the
issue measured). Long streams make the per-stream costs (connect, head,
access line) a small, subtracted part. Beside it, each event's latency on
one stream (10 ms apart) less the latency straight from the upstream: what
the proxy adds. Targets alternate within each round, and the median and
min-max over rounds are printed, because two shared cores are noisy.

Targets: nginx; ``gevent-relay``, ten lines of gevent that copy each read
(the floor of any gevent design); ``floor``, gunicorn + gevent + forkproxy's
pool exchange and stream read with no framing or hooks (the floor of this
design); forkproxy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from scripts.benchkit import harness
from scripts.benchkit.harness import CLK, ROOT, Target, client, cpu_ticks

STREAMS, INTERVAL_MS = "32", "5"


def stream_cpu_us(target: Target, events: int, reps: int) -> float:
    """Proxy CPU per stream of ``events`` events, 32 at a time."""
    pids = target.pids()
    before = cpu_ticks(pids)
    for _ in range(reps):
        client("sse", "latency", target.url, STREAMS, str(events), INTERVAL_MS)
    return (cpu_ticks(pids) - before) / CLK * 1e6 / (reps * int(STREAMS))


def measure(target: Target, events: int, reps: int) -> dict:
    client("sse", "latency", target.url, STREAMS, "5", INTERVAL_MS)  # warm: connections, code paths
    long_stream, one_event = stream_cpu_us(target, events, reps), stream_cpu_us(target, 1, reps)
    latency = client("sse", "latency", target.url, "1", "200", "10")["p50_ms"]
    return {"cpu_us_per_unit": (long_stream - one_event) / (events - 1), "cpu_us_per_stream": long_stream,
            "latency_p50_ms": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="nginx,gevent-relay,floor,forkproxy")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--reps", type=int, default=2, help="sets of 32 streams per figure")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args()
    targets = args.targets.split(",")
    upstream = harness.Upstream("sse")
    runs: dict[str, list[dict]] = {name: [] for name in ["direct", *targets]}
    try:
        for round_ in range(args.rounds):
            runs["direct"].append({"latency_p50_ms": client("sse", "latency", upstream.url, "1", "200", "10")["p50_ms"]})
            for name in targets if round_ % 2 == 0 else targets[::-1]:
                target = Target(name, upstream.url)
                try:
                    runs[name].append(measure(target, args.events, args.reps))
                finally:
                    target.stop()
                print(f"[{round_ + 1}/{args.rounds}] {name}: {runs[name][-1]}", flush=True)
    finally:
        upstream.stop()
    direct = statistics.median(r["latency_p50_ms"] for r in runs["direct"])
    print(f"\n{args.events}-event streams, {STREAMS} at a time, {INTERVAL_MS} ms apart; median (min-max) of "
          f"{args.rounds} rounds; latency on one stream, added to the upstream's own ({direct:.3f} ms)")
    print(f"{'target':14s} {'CPU µs/unit':>22s} {'added latency p50 ms':>26s}")
    for name in targets:
        units = [r["cpu_us_per_unit"] for r in runs[name]]
        added = [r["latency_p50_ms"] - direct for r in runs[name]]
        print(f"{name:14s} {statistics.median(units):8.1f} ({min(units):.1f}-{max(units):.1f})"
              f"      {statistics.median(added):8.3f} ({min(added):.3f}-{max(added):.3f})")
    Path(args.out).mkdir(exist_ok=True)
    out = Path(args.out) / f"units-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
