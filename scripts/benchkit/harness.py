"""What every bench shares: its CPUs, ports, the processes it starts and measures, wrk, CPU and memory readings.

Python targets run with one worker pinned to CPU 0 (``PROXY_CPU``); the load
generator and the upstreams run on CPU 1 (``LOAD_CPU``). Each bench
(``run``, ``llm``, ``tunnels``, ``pools``, ``limits``, ``census``, ``ablate``,
``floor``) takes its shared helpers from here; one bench borrows from another
only one way (``run`` runs ``llm``'s workloads, ``limits`` measures as
``pools`` does), so no two import each other.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchkit.nginx import NginxProcess, stop_group

ROOT = Path(__file__).resolve().parents[2]
CLK = os.sysconf("SC_CLK_TCK")
PROXY_CPU, LOAD_CPU = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def pin(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") else []


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout
        frontier = [int(p) for p in out.split()]
        pids += frontier
    return pids


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def mem_kib(pids: list[int], field: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# -- upstreams and targets ------------------------------------------------------

class Process:
    """A started process group the bench can measure and stop."""

    name = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))

    def spawn(self, cmd: list[str], cpu: str, env: dict | None = None) -> None:
        log = open(self.tmp / "out.log", "wb")
        self.proc = subprocess.Popen(pin(cpu) + cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, signal.SIGTERM)
        shutil.rmtree(self.tmp, ignore_errors=True)


class Nginx(Process):
    """nginx with an http-context ``body``, pinned to ``cpu``."""

    def __init__(self, name: str, body: str, cpu: str) -> None:
        self.name = name
        super().__init__()
        self.nginx = NginxProcess(body, pin(cpu))
        self.proc = self.nginx.proc

    def stop(self) -> None:
        self.nginx.stop()
        super().stop()


def remove_lmdb(path: str | Path) -> None:
    """An LMDB store file a bench made (a ``local`` limits store), and its lock file."""
    for suffix in ("", "-lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def static_upstream(port: int, html: Path) -> Nginx:
    (html / "b").mkdir()
    (html / "b" / "small").write_bytes(b"s" * 100)
    (html / "b" / "big").write_bytes(b"b" * (1 << 20))
    body = f"""server {{ listen 127.0.0.1:{port} backlog=8192; root {html};
      location = /b/post {{ client_max_body_size 10m; client_body_buffer_size 1m; return 200 "ok"; }} }}"""
    up = Nginx("upstream", body, LOAD_CPU)
    wait_port(port)
    return up


class Target(Process):
    """One thing the load is pointed at; ``url`` is where."""

    nginx: NginxProcess | None = None

    def __init__(self, name: str, upstream: str, workers: int = 1, env: dict | None = None) -> None:
        self.name = name
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if name == "direct":
            self.url = upstream
            return
        if name == "nginx":
            host = upstream.removeprefix("http://")
            # Upgrades pass (the usual map); everything else keeps its keep-alive connection to the upstream.
            body = f"""upstream up {{ server {host}; keepalive 256; }}
              map $http_upgrade $conn {{ default upgrade; "" ""; }}
              server {{ listen 127.0.0.1:{self.port} backlog=8192; client_max_body_size 10m;
                location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection $conn;
                  proxy_set_header Upgrade $http_upgrade; proxy_buffering off; proxy_read_timeout 600s; }} }}"""
            self.nginx = NginxProcess(body, pin(PROXY_CPU))
            self.proc = self.nginx.proc
        elif name == "gevent-relay":  # no HTTP, no WSGI: the floor of any gevent design (benchkit/gevent_relay.py)
            self.spawn([sys.executable, "-m", "scripts.benchkit.gevent_relay", str(self.port), upstream], PROXY_CPU)
        elif name == "proxypy":
            # --threaded: proxy.py's default threadless mode fails under keep-alive load here
            self.spawn([sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(self.port),
                        "--num-workers", "1", "--num-acceptors", "1", "--threaded", "--enable-reverse-proxy",
                        "--plugins", "scripts.benchkit.proxypy_plugin.BenchReverseProxy", "--log-level", "WARNING",
                        "--backlog", "8192"],
                       PROXY_CPU, {"BENCH_UPSTREAM": upstream, "PYTHONPATH": str(ROOT)})
        else:
            app = {"forkproxy": "forkproxy.app", "empty": "scripts.benchkit.apps:empty",
                   "floor": "scripts.benchkit.apps:pool_floor",
                   "naive": "scripts.benchkit.apps:naive", "werkzeug": "scripts.benchkit.apps:werkzeug",
                   "forkproxy+hooks": "scripts.benchkit.apps:ws_messages",
                   "forkproxy+limit": "scripts.benchkit.apps:limited", "census": "scripts.benchkit.census:app",
                   "forkproxy+ablated": "scripts.benchkit.ablate:app",
                   "llm-example": "examples.llm_gateway:app"}[name]
            self.spawn([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--workers", str(workers),
                        "--bind", f"127.0.0.1:{self.port}", "--no-control-socket", "--access-logfile", "/dev/null",
                        "--backlog", "8192", "--log-level", "warning", app],
                       PROXY_CPU, {"FORKPROXY_UPSTREAM": upstream, "BENCH_UPSTREAM": upstream,
                                   "PYTHONPATH": str(ROOT), **(env or {})})
        wait_port(self.port)
        time.sleep(0.5)  # workers boot after the master listens

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        super().stop()



# -- load and readings ----------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.match(r"([0-9.]+)([a-z]+)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, conns: int, secs: float, script: Path | None = None) -> dict:
    cmd = pin(LOAD_CPU) + ["wrk", "-t1", f"-c{conns}", f"-d{max(int(secs), 1)}s", "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", str(script)]
    done = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=secs + 60)
    out = done.stdout
    if "requests in" not in out:
        raise RuntimeError(f"wrk failed against {url}: {out} {done.stderr}")
    result = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
              "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
              "errors": 0}
    transfer = re.search(r"Transfer/sec:\s+([0-9.]+)([KMG]?B)", out)
    result["mb_per_s"] = float(transfer.group(1)) * {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}[transfer.group(2)] * 1.048576
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    for m in re.finditer(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout)[: ]+(\d+)", out):
        result["errors"] += int(m.group(1))
    return result


def alternating_args(doc: str, seconds: float, tools: tuple[str, ...] = ("nginx", "wrk")) -> argparse.Namespace:
    """``--repeat`` and ``--seconds`` of a bench that alternates variants; exits when a tool it runs is missing."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=seconds)
    args = parser.parse_args()
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        sys.exit(f"needs {', '.join(missing)} (Debian packages {', '.join(missing)})")
    return args


def post_script(directory: Path) -> Path:
    """A wrk script that makes every request a 64 KiB POST."""
    path = directory / "post.lua"
    path.write_text('wrk.method = "POST"\nwrk.body = string.rep("p", 65536)\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


def cpu_per_request(target: Target, path: str, secs: float, script: Path | None = None) -> float:
    """The target's CPU per request to ``path`` under 50 connections for ``secs``, after a 1 s warm-up."""
    pids = target.pids()
    wrk(target.url + path, 50, 1, script)  # warm the pools
    before = cpu_ticks(pids)
    result = wrk(target.url + path, 50, secs, script)
    return (cpu_ticks(pids) - before) / CLK * 1e6 / result["requests"]



def start_holder(module: str, target: Target, count: int, seconds: float,
                 path: str = "") -> tuple[subprocess.Popen, int]:
    """``module``'s hold client keeping ``count`` idle connections to ``target`` (at ``path``) open; and how many opened."""
    cmd = pin(LOAD_CPU) + [sys.executable, "-m", f"scripts.benchkit.{module}", "hold", target.url + path,
                           str(count), str(seconds)]
    holder = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().split()
    return holder, int(line[1]) if len(line) == 2 else 0


def held(module: str, target: Target, count: int, seconds: float, path: str = "") -> dict:
    """The target's RSS growth per connection while ``count`` idle ones (``module``'s hold) are open."""
    before = mem_kib(target.pids())
    holder, opened = start_holder(module, target, count, seconds, path)
    time.sleep(1)
    after = mem_kib(target.pids())
    holder.wait(180)
    return {"streams": opened, "kib_per_stream": (after - before) / opened if opened else None,
            "rss_mib": after / 1024}


# -- bench modules run as their own processes ------------------------------------------

class Upstream(Process):
    """A bench module's ``serve`` (``sse``, ``ws``, ``openai``) on a free port, on the load's CPU."""

    def __init__(self, module: str) -> None:
        self.name = module
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spawn([sys.executable, "-m", f"scripts.benchkit.{module}", "serve", str(self.port)], LOAD_CPU)
        wait_port(self.port)


def client(module: str, *args: str, timeout: float = 300) -> dict:
    """What a bench module's client command (``latency``, ``rate``, ``ttfc``...) printed, as JSON."""
    cmd = pin(LOAD_CPU) + [sys.executable, "-m", f"scripts.benchkit.{module}", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout).stdout
    return json.loads(out)
