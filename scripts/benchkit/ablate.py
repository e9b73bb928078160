"""What forkproxy's own per-request work costs under load: ``scripts/bench --ablate``.

Isolated loops (``--floor``) time each rule at a fraction of what it costs
inside a loaded worker, where the code runs cold between network calls; and
each rule alone is below this machine's run-to-run noise. So this switches
the contract's optional-looking work off *together*, in a forkproxy that is
otherwise the same, and measures the CPU per small GET and per 64 KiB POST
through the real gunicorn (one gevent worker on CPU 0; wrk and the static
nginx upstream on CPU 1), alternating with forkproxy as shipped and with the
design's floor (``apps.pool_floor``):

- the checks of the upstream request (method, path, every header line);
- the request ID (read, made, sent, answered);
- the client's headers as a header dict (only Host is kept);
- the upstream request's headers (the client's, filtered, and X-Forwarded-*: only Accept is sent);
- the rules on the reply's headers (only Content-Length and X-Request-ID reach gunicorn).

A forkproxy without these is not a correct proxy; the figure says how much
of the gap between forkproxy and the floor such work could ever recover.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from scripts.benchkit.harness import Target, alternating_args, cpu_per_request, free_port, post_script, static_upstream

OFF = "BENCH_ABLATE"  # set (to anything) in the worker: the work above is switched off


def _ablated():
    from forkproxy import Proxy
    from forkproxy.http import headers
    from forkproxy.server import inbound
    from forkproxy import lifecycle

    if os.environ.get(OFF):
        lifecycle._check_upstream_request = lambda ureq: None
        lifecycle.request_id = lambda incoming: "0123456789abcdef0123456789abcdef"
        inbound.headers_from_environ = lambda environ: headers.header_dict([("Host", environ.get("HTTP_HOST", ""))])
        headers.upstream_request_headers = lambda client, **_: headers.header_dict([("Accept", "*/*")])
        headers.client_response_headers = lambda upstream, **_: []
    return Proxy(os.environ["BENCH_UPSTREAM"])


app = _ablated() if "BENCH_UPSTREAM" in os.environ else None


def main() -> None:
    args = alternating_args(__doc__, 4)
    html = Path(tempfile.mkdtemp(prefix="ablate-"))
    post = post_script(html)
    port = free_port()
    upstream, url = static_upstream(port, html), f"http://127.0.0.1:{port}"
    variants = {"forkproxy": ("forkproxy+ablated", {}), "forkproxy, that work off": ("forkproxy+ablated", {OFF: "1"}),
                "floor": ("floor", {})}
    cpu = {(name, kind): [] for name in variants for kind in ("small", "post")}
    try:
        for _ in range(args.repeat):
            for name, (app_name, env) in variants.items():
                target = Target(app_name, url, env=env)
                try:
                    cpu[name, "small"].append(cpu_per_request(target, "/b/small", args.seconds))
                    cpu[name, "post"].append(cpu_per_request(target, "/b/post", args.seconds, post))
                finally:
                    target.stop()
    finally:
        upstream.stop()
        shutil.rmtree(html, ignore_errors=True)
    print(f"CPU per request, one gevent worker, median of {args.repeat} alternating runs of {args.seconds:g} s:")
    base = {kind: statistics.median(cpu["forkproxy", kind]) for kind in ("small", "post")}
    for name in variants:
        cells = []
        for kind, label in (("small", "small GET"), ("post", "64 KiB POST")):
            median = statistics.median(cpu[name, kind])
            cells.append(f"{label} {median:6.1f} us ({median - base[kind]:+6.1f})")
        print(f"  {name:26} " + "   ".join(cells))


if __name__ == "__main__":
    main()
