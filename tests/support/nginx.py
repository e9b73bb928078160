"""A real nginx in front of gunicorn, running the repo's deploy/nginx/forkproxy.conf."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.gunicorn import REPO

SITE = REPO / "deploy" / "nginx" / "forkproxy.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

MAIN = """
worker_processes 1;
daemon off;
{user}
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  include {prefix}/site.conf;
}}
"""


class Nginx:
    """nginx on 127.0.0.1:<port> with the shipped site, its upstream pointed at ``server``."""

    def __init__(self, server: str) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
            (self.prefix / sub).mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        site = SITE.read_text()
        site = re.sub(r"^(\s*)server 127\.0\.0\.1:8080;", rf"\1server {server};", site, flags=re.M)
        site = re.sub(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{self.port};", site, flags=re.M)
        (self.prefix / "site.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        (self.prefix / "nginx.conf").write_text(MAIN.format(prefix=self.prefix, user=user))
        self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.prefix / "error.log").read_text())
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)
