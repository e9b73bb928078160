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
import subprocess
import sys
import time

from scripts.benchkit.nginx import NginxProcess
from scripts.benchkit.run import (CLK, LOAD_CPU, PROXY_CPU, ROOT, Process, cpu_ticks, free_port, mem_kib, pin,
                                  wait_port)

TARGETS = ["direct", "nginx", "forkproxy", "forkproxy+hooks"]


class Upstream(Process):
    def __init__(self, module: str) -> None:
        self.name = module
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spawn([sys.executable, "-m", f"scripts.benchkit.{module}", "serve", str(self.port)], LOAD_CPU)
        wait_port(self.port)


class Target(Process):
    nginx: NginxProcess | None = None

    def __init__(self, name: str, upstream: str) -> None:
        self.name = name.replace("+", "-")
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if name == "direct":
            self.url = upstream
            return
        if name == "nginx":
            body = f"""map $http_upgrade $conn {{ default upgrade; "" ""; }}
              server {{ listen 127.0.0.1:{self.port} backlog=8192;
                location / {{ proxy_pass {upstream}; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;
                  proxy_set_header Connection $conn; proxy_buffering off; proxy_read_timeout 600s; }} }}"""
            self.nginx = NginxProcess(body, pin(PROXY_CPU))
            self.proc = self.nginx.proc
        else:
            app = "forkproxy.app" if name == "forkproxy" else "scripts.benchkit.apps:ws_messages"
            self.spawn([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--workers", "1",
                        "--bind", f"127.0.0.1:{self.port}", "--no-control-socket", "--access-logfile", "/dev/null",
                        "--backlog", "8192", "--log-level", "warning", app],
                       PROXY_CPU, {"FORKPROXY_UPSTREAM": upstream, "BENCH_UPSTREAM": upstream,
                                   "PYTHONPATH": str(ROOT)})
        wait_port(self.port)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        super().stop()


def client(module: str, *args: str, timeout: float = 300) -> dict:
    cmd = pin(LOAD_CPU) + [sys.executable, "-m", f"scripts.benchkit.{module}", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout).stdout
    return json.loads(out)


def held_kib(module: str, target: Process, url: str, count: int) -> float | None:
    """RSS growth of ``target`` per connection while ``count`` idle ones are held open."""
    pids = target.pids()
    before = mem_kib(pids)
    cmd = pin(LOAD_CPU) + [sys.executable, "-m", f"scripts.benchkit.{module}", "hold", url, str(count), "3"]
    holder = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().split()
    opened = int(line[1]) if len(line) == 2 else 0
    time.sleep(1)
    after = mem_kib(target.pids())
    holder.wait(180)
    time.sleep(0.5)
    return (after - before) / opened if opened else None


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
        out["kib_per_tunnel"] = held_kib("ws", target, target.url, args.hold)
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
            sse_kib = held_kib("sse", sse_target, sse_target.url, args.hold)
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
