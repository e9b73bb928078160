"""An nginx of our own (prefix, pid, temp paths, logs in one folder), for the bench and the tests."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

BINARY = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

MAIN = """
worker_processes 1;
daemon off;
{user}
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 10000000;
  include {prefix}/site.conf;
}}
"""


class NginxProcess:
    """nginx running ``site`` (http-context config) from a fresh prefix folder."""

    def __init__(self, site: str, pin: list[str] = ()) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-"))
        for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
            (self.prefix / sub).mkdir()
        (self.prefix / "site.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""  # root's workers would run as nobody otherwise
        conf = self.prefix / "nginx.conf"
        conf.write_text(MAIN.format(prefix=self.prefix, user=user))
        self.proc = subprocess.Popen([*pin, BINARY, "-p", str(self.prefix), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [self.proc.pid, *map(int, out.split())]

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGQUIT)  # nginx's graceful stop
        shutil.rmtree(self.prefix, ignore_errors=True)


def stop_group(proc: subprocess.Popen, first: int) -> None:
    """Send ``first`` to a process group started with start_new_session; kill it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, first)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
