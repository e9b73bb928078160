"""proxy.py's reverse proxy, sending every path to $BENCH_UPSTREAM."""
import os

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

_UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9").encode()


class BenchReverseProxy(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/(.*)$"]

    def handle_route(self, request, pattern):
        url = Url.from_bytes(_UPSTREAM)
        url.remainder = request.path
        return url
