"""WebSocket tunnels under load: ``scripts/bench --tunnels``.

Targets, each with one worker pinned to CPU 0 (the upstream and the load on
CPU 1): the upstream direct, nginx proxying upgrades, forkproxy copying bytes
(``forkproxy.app``), and forkproxy with a pass-through ``on_ws_message``
(every message parsed and re-framed by wsproto). Figures:

- echo round trip of a 16-byte message at 1 tunnel and at 500 (each sending
  every 500 ms): p50/p99, and the p50 added over direct;
- messages/s through the one worker (10 tunnels, 32 messages in flight each)
  and the proxy's CPU per message;
- memory per open idle tunnel (1,000 held), beside an open idle SSE stream of
  forkproxy's measured the same way in the same run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from scripts.benchkit.harness import CLK, LOAD_CPU, PROXY_CPU, Target, Upstream, client, cpu_ticks, held

TARGETS = ["direct", "nginx", "forkproxy", "forkproxy+hooks"]


def measure(target: Target, args) -> dict:
    out = {"lat_1": client("ws", "latency", target.url, "1", "200", "5"),
           "lat_500": client("ws", "latency", target.url, "500", "10", "500")}
    pids = target.pids() if target.name != "direct" else []
    client("ws", "rate", target.url, "10", "1", "32")  # warm
    before = cpu_ticks(pids)
    out["rate"] = client("ws", "rate", target.url, "10", str(args.seconds), "32")
    spent = cpu_ticks(pids) - before
    out["rate"]["cpu_us_per_msg"] = spent / CLK * 1e6 / out["rate"]["messages"] if pids else None
    if pids:
        out["kib_per_tunnel"] = held("ws", target, args.hold, 3)["kib_per_stream"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--hold", type=int, default=1000)
    args = parser.parse_args()
    if not shutil.which("nginx"):
        sys.exit("needs nginx (Debian package nginx)")
    ws_up, sse_up = Upstream("ws"), Upstream("sse")
    results = {}
    try:
        for name in TARGETS:
            target = Target(name, ws_up.url)
            try:
                results[name] = measure(target, args)
            finally:
                target.stop()
        sse_target = Target("forkproxy", sse_up.url)
        try:
            sse_kib = held("sse", sse_target, args.hold, 3)["kib_per_stream"]
        finally:
            sse_target.stop()
    finally:
        ws_up.stop()
        sse_up.stop()
    report(results, sse_kib, args)


def report(results: dict, sse_kib: float | None, args) -> None:
    direct = results["direct"]
    print(f"Tunnels: one worker on CPU {PROXY_CPU}, upstream and load on CPU {LOAD_CPU}; 16-byte echo messages")
    print(f"{'target':16} {'p50 @1':>8} {'+p50 @1':>8} {'p50 @500':>9} {'+p50 @500':>10} {'p99 @500':>9} "
          f"{'msg/s':>8} {'CPU us/msg':>10} {'KiB/tunnel':>10}")
    for name, r in results.items():
        add1 = r["lat_1"]["p50_ms"] - direct["lat_1"]["p50_ms"]
        add500 = r["lat_500"]["p50_ms"] - direct["lat_500"]["p50_ms"]
        cpu = r["rate"].get("cpu_us_per_msg")
        kib = r.get("kib_per_tunnel")
        print(f"{name:16} {r['lat_1']['p50_ms']:7.3f}m {add1:+7.3f}m {r['lat_500']['p50_ms']:8.3f}m "
              f"{add500:+9.3f}m {r['lat_500']['p99_ms']:8.3f}m {r['rate']['per_s']:8.0f} "
              f"{cpu if cpu is not None else float('nan'):10.1f} {kib if kib is not None else float('nan'):10.1f}")
    print(f"forkproxy, an open idle SSE stream, same run: {sse_kib:.1f} KiB ({args.hold} held)")
    print(json.dumps({"tunnels": results, "sse_kib_per_stream": sse_kib}))


if __name__ == "__main__":
    main()
