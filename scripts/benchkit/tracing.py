"""What traces cost: ``scripts/bench --tracing``.

forkproxy as shipped (``forkproxy.app``, one gevent worker on CPU 0), with
tracing off (no ``OTEL_*`` variable: the default), on at 100% sampling
(``OTEL_TRACES_SAMPLER=always_on``) and on at 1%
(``parentbased_traceidratio``, argument 0.01), exporting OTLP over HTTP with
OpenTelemetry's defaults otherwise (batches of 512, a queue of 2048, every
5 s). wrk, the upstreams (static nginx; the SSE upstream of
``scripts/benchkit/sse.py``) and the OTLP receiver (``serve`` below, its own
process) run on CPU 1. Under 50 connections, per variant: requests/s and the
worker's CPU per request of a small GET (100 bytes) and of an event stream of
``EVENTS`` events (``/b/sse``, which wrk reads as one chunked reply); the CPU
includes the worker's batch exporter, which runs in the same process.

Variants alternate within each of ``--repeat`` rounds (reversed every other
round); ``off`` runs twice a round (first and last), and the gap between its
two medians is the run's own measure of noise. Each target is probed once
(a 200, every event), and its spans are counted at the receiver once the
worker has stopped (a graceful stop flushes): spans per request shows the
variant traced as it says (2 at 100%: a SERVER and a CLIENT span, a little
more as wrk leaves up to 50 requests uncounted at a run's end; about 0.02 at
1%; fewer when the bounded queue dropped some).

The receiver only counts: it parses each export with ``opentelemetry-proto``
and keeps the number of spans, so that its own cost on the load's CPU stays
small (``tests/support/otlp_receiver.py`` keeps every span, for the tests).

    python -m scripts.benchkit.tracing [--repeat N] [--seconds S]
    python -m scripts.benchkit.tracing serve PORT     (the receiver; GET / answers its count)
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scripts.benchkit import harness
from scripts.benchkit.harness import CLK, Target, alternating_args, cpu_ticks, free_port, static_upstream, wrk

EVENTS = 20
SSE_PATH = f"/b/sse?events={EVENTS}&interval=0"
AGAIN = "off, again"  # the second ``off`` of each round: a noise check, not a variant of its own
SAMPLERS = {"off": None, "on, 100%": ("always_on", ""), "on, 1%": ("parentbased_traceidratio", "0.01")}


# -- the receiver (its own process) ----------------------------------------------------------

class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    spans = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        export = ExportTraceServiceRequest()
        export.ParseFromString(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        _Counting.spans += sum(len(scope.spans) for rs in export.resource_spans for scope in rs.scope_spans)
        self._answer(b"")  # an empty ExportTraceServiceResponse: all accepted

    def do_GET(self) -> None:
        self._answer(str(_Counting.spans).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), _Counting).serve_forever()


def received(receiver: harness.Upstream) -> int:
    with urllib.request.urlopen(receiver.url, timeout=10) as reply:
        return int(reply.read())


# -- the load ----------------------------------------------------------------------------------

def variant_env(name: str, receiver: harness.Upstream) -> dict:
    sampler = SAMPLERS["off" if name == AGAIN else name]
    if sampler is None:
        return {}
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_TRACES_SAMPLER": sampler[0],
            "OTEL_TRACES_SAMPLER_ARG": sampler[1]}


def probe(url: str, events: int | None) -> None:
    """One request: a 200, and for a stream all its events; else the variant is broken and the bench stops."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        body = reply.read()
    if events is not None and body.count(b"data: ") != events:
        raise RuntimeError(f"{url}: {body.count(b'data: ')} events of {events}: {body[-300:]!r}")


def measure(name: str, upstream: str, path: str, secs: float, receiver: harness.Upstream) -> dict:
    """rps, CPU per request and spans per request of a worker serving ``name`` (started and stopped here)."""
    target = Target("forkproxy", upstream, env=variant_env(name, receiver))
    before_spans = received(receiver)
    try:
        probe(target.url + path, EVENTS if path == SSE_PATH else None)
        pids = target.pids()
        warm = wrk(target.url + path, 50, 1)
        before = cpu_ticks(pids)
        result = wrk(target.url + path, 50, secs)
        cpu_us = (cpu_ticks(pids) - before) / CLK * 1e6 / result["requests"]
    finally:
        target.stop()  # SIGTERM: a graceful stop, which flushes the worker's spans
    spans = received(receiver) - before_spans
    return {"rps": result["rps"], "cpu_us": cpu_us, "errors": result["errors"],
            "spans_per_request": spans / (1 + warm["requests"] + result["requests"])}


def rounds(args, static: str, sse: str, receiver: harness.Upstream) -> dict:
    """Every variant's runs: {name: {"small": [...], "sse": [...]}}, alternating within each round."""
    order = [*SAMPLERS, AGAIN]
    runs = {name: {"small": [], "sse": []} for name in order}
    for rep in range(args.repeat):
        for name in order if rep % 2 == 0 else order[::-1]:
            print(f"[{rep + 1}/{args.repeat}] {name}", flush=True)
            runs[name]["small"].append(measure(name, static, "/b/small", args.seconds, receiver))
            runs[name]["sse"].append(measure(name, sse, SSE_PATH, args.seconds, receiver))
    return runs


def print_table(runs: dict, args) -> None:
    base = {kind: statistics.median(r["cpu_us"] for r in runs["off"][kind]) for kind in ("small", "sse")}
    print(f"\nforkproxy.app, one gevent worker on CPU {harness.PROXY_CPU}, 50 connections; median of {args.repeat} "
          f"alternating runs of {args.seconds:g} s (CPU min-max in brackets); SSE: {EVENTS} events per stream\n")
    print("| tracing | small GET req/s | CPU us/req | vs off | spans/req | SSE streams/s | CPU us/stream | vs off "
          "| spans/stream |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kinds in runs.items():
        cells = []
        for kind in ("small", "sse"):
            got = kinds[kind]
            cpu = [r["cpu_us"] for r in got]
            median = statistics.median(cpu)
            cells += [f"{statistics.median(r['rps'] for r in got):.0f}",
                      f"{median:.1f} [{min(cpu):.1f}-{max(cpu):.1f}]", f"{median - base[kind]:+.1f}",
                      f"{statistics.median(r['spans_per_request'] for r in got):.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    errors = sum(r["errors"] for kinds in runs.values() for got in kinds.values() for r in got)
    print(f"\nnoise: '{AGAIN}' is the same as 'off', run at the other end of every round; wrk errors: {errors}")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        return serve(int(sys.argv[2]))
    args = alternating_args(__doc__, 3)
    html = Path(tempfile.mkdtemp(prefix="tracing-"))
    port = free_port()
    static, sse, receiver = static_upstream(port, html), harness.Upstream("sse"), harness.Upstream("tracing")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        runs = rounds(args, f"http://127.0.0.1:{port}", sse.url, receiver)
    finally:
        for process in (static, sse, receiver):
            process.stop()
        shutil.rmtree(html, ignore_errors=True)
    print(f"started {started}")
    print_table(runs, args)


if __name__ == "__main__":
    main()
