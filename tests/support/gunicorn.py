"""Run the real gunicorn, with the repo's gunicorn.conf.py and gevent workers."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "gunicorn.conf.py"


class Gunicorn:
    """One gunicorn master on a pre-bound loopback socket (no port races)."""

    def __init__(self, app: str, env: dict | None = None, args: tuple = (), workers: int = 1,
                 unix_path: str | None = None) -> None:
        self.app = app
        self.unix_path = unix_path
        self.env = env or {}
        self.args = tuple(args)
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])

    def start(self, wait: bool = True) -> "Gunicorn":
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(2048)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fds = [self.listener.fileno()]
        if self.unix_path:  # gunicorn ignores address binds once it is handed fds: bind this one too
            self.unix_listener = socket.socket(socket.AF_UNIX)
            self.unix_listener.bind(self.unix_path)
            self.unix_listener.listen(2048)
            fds.append(self.unix_listener.fileno())
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        binds = [arg for fd in fds for arg in ("--bind", f"fd://{fd}")]
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(CONF), *binds,
               "--no-control-socket", "--workers", str(self.workers), *self.args, self.app]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, pass_fds=fds, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_booted()
        return self

    def wait_booted(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= self.workers and "Booting worker" in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn workers did not boot:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            out = _children(self.proc.pid)
        return [int(p) for p in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 5) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
            self.listener.close()
            if self.unix_path:
                self.unix_listener.close()


def _children(pid: int) -> str:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(entry)
    return " ".join(kids)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_connections(pid: int, port: int) -> int:
    """Connections to ``port`` (the proxy's) that process ``pid`` still holds open."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            held += 1
    return held
