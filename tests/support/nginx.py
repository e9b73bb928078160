"""A real nginx in front of gunicorn, running the repo's deploy/nginx/forkproxy.conf."""
from __future__ import annotations

import re
import socket
import time

from scripts.benchkit.nginx import BINARY, NginxProcess
from tests.support.gunicorn import REPO
from tests.support.servers import free_port

SITE = REPO / "deploy" / "nginx" / "forkproxy.conf"
NGINX = BINARY


class Nginx(NginxProcess):
    """nginx on 127.0.0.1:<port> with the shipped site, its upstream pointed at ``server``."""

    def __init__(self, server: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = SITE.read_text()
        site = re.sub(r"^(\s*)server 127\.0\.0\.1:8080;", rf"\1server {server};", site, flags=re.M)
        site = re.sub(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{self.port};", site, flags=re.M)
        super().__init__(site)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.error_log())
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")
