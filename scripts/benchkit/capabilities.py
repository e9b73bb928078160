"""What each failover and limits capability costs when it is on: ``scripts/bench --capabilities``.

Through the real gunicorn (one gevent worker on CPU 0; wrk, the static nginx
upstream and the SSE upstream of ``scripts/benchkit/sse.py`` on CPU 1), with
50 connections, the proxy's CPU per request of

- a small GET (100 bytes, buffered), and
- an event stream of ``EVENTS`` events sent back to back (``/b/sse``, which
  wrk reads as one chunked reply): per stream, and per unit (the stream's
  figure over its events: each event is one unit of the relay),

for ``Proxy(upstream)`` as shipped (``off``) and with one capability on at a
time: ``first_byte_timeout=10``; a one-member ``UpstreamPool`` whose member
has a ``name`` and ``meta`` (alone, then with a ``before_attempt`` hook that
sets one header from ``upstream.meta``, so the hook's own cost is the
difference of the two); ``judge_reply`` returning None; ``resume_stream``
returning False (asked only when a stream fails: none does here);
``deadline=60``; ``rate_limits`` returning one ``Limit`` in the ``local``
store (in /dev/shm, as ``local`` is, far above the load, as ``--limits`` sets
it up); ``on_stream_chunk`` writing each unit back (what a hook costs per
unit); ``on_ws_message`` defined (it only runs in tunnels: none here, so its
row shows what a hook that does not apply costs); and traces on, every
request sampled and exported to the receiver of ``scripts/benchkit/tracing.py``
on CPU 1 (``--tracing`` has 1% sampling too).

Variants alternate within each of ``--repeat`` rounds (the order reversed on
every other round, against drift); ``off`` runs twice in each round (first and
last), and the gap between its two medians is this run's own measure of
noise. Every target is probed once before its load (status, and the stream's
event count), so a capability that breaks a reply fails the bench instead of
looking cheap. Each variant starts its worker twice a round (one upstream
each), so a round costs 24 x (``--seconds`` + 1 s of warm-up + ~2 s to start
and stop): the defaults (3 rounds of 3 s) take about 7 minutes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from scripts.benchkit import harness, tracing
from scripts.benchkit.harness import ROOT, Target, alternating_args, cpu_per_request, free_port, static_upstream

CHOICE = "BENCH_CAPABILITY"  # in the worker: which variant ``app`` is
STORE = "BENCH_LIMITS_STORE"  # in the worker: the rate-limit variant's store
EVENTS = 20
SSE_PATH = f"/b/sse?events={EVENTS}&interval=0"
AGAIN = "off, again"  # the second ``off`` of each round: not a variant of its own, a noise check
LABELS = {"off": "off (Proxy(upstream))", "first_byte": "first_byte_timeout=10",
          "pool": "UpstreamPool, 1 member", "before_attempt": "pool + before_attempt",
          "judge_reply": "judge_reply -> None", "resume_stream": "resume_stream -> False",
          "deadline": "deadline=60", "rate_limits": "rate_limits, 1 local Limit",
          "stream_chunk": "on_stream_chunk, pass-through", "ws_message": "on_ws_message (no tunnel)",
          "tracing": "tracing, 100% sampled"}


def variants() -> dict:
    """Each variant's Proxy, built from the upstream URL (imported in the worker, after gevent's patching)."""
    from forkproxy import Limit, Proxy, Upstream, UpstreamPool

    def pool(url: str) -> UpstreamPool:
        return UpstreamPool([Upstream(url, name="a", meta={"key": "k"})])

    class BeforeAttempt(Proxy):
        def before_attempt(self, req, ureq, upstream):
            ureq.headers["X-Bench-Key"] = upstream.meta["key"]

    class JudgeReply(Proxy):
        def judge_reply(self, req, ures):
            return None

    class ResumeStream(Proxy):
        def resume_stream(self, req, ureq, stats, upstream):
            return False

    class StreamChunk(Proxy):
        def on_stream_chunk(self, chunk, out, stats):
            out.write(chunk)

    class WsMessage(Proxy):
        def on_ws_message(self, msg, out, stats):
            out.send(msg)

    class RateLimited(Proxy):
        def rate_limits(self, req):
            return [Limit("rpm:bench-client", rate=1e9, per=60)]

    return {"off": Proxy, "first_byte": lambda url: Proxy(url, first_byte_timeout=10),
            "pool": lambda url: Proxy(pool(url)), "before_attempt": lambda url: BeforeAttempt(pool(url)),
            "judge_reply": JudgeReply, "resume_stream": ResumeStream,
            "deadline": lambda url: Proxy(url, deadline=60),
            "rate_limits": lambda url: RateLimited(url, limits_store=os.environ[STORE]),
            "stream_chunk": StreamChunk, "ws_message": WsMessage, "tracing": Proxy}


app = variants()[os.environ[CHOICE]](os.environ["BENCH_UPSTREAM"]) if CHOICE in os.environ else None


class CapabilityTarget(Target):
    """``Target("forkproxy")`` serving this module's ``app`` in its place.

    ``harness.Target`` maps a fixed list of names to apps; this swaps the app
    argument, the last of the gunicorn command, so the worker is started
    exactly as every other bench starts forkproxy.
    """

    def __init__(self, upstream: str, env: dict) -> None:
        super().__init__("forkproxy", upstream, env=env)

    def spawn(self, cmd: list[str], cpu: str, env: dict | None = None) -> None:
        super().spawn(cmd[:-1] + ["scripts.benchkit.capabilities:app"], cpu, env)  # not __name__: run as __main__


def probe(url: str, events: int | None) -> None:
    """One request: a 200, and for a stream all its events; else the variant is broken and the bench stops."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        body = reply.read()
    if events is not None and body.count(b"data: ") != events:
        raise RuntimeError(f"{url}: {body.count(b'data: ')} events of {events}: {body[-300:]!r}")


def measure(choice: str, upstream: str, path: str, secs: float, env: dict) -> float:
    """The CPU per request to ``path`` of a worker serving variant ``choice`` (started and stopped here)."""
    target = CapabilityTarget(upstream, {CHOICE: choice, **env})
    try:
        try:
            probe(target.url + path, EVENTS if path == SSE_PATH else None)
        except OSError as exc:
            log = (target.tmp / "out.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"variant {choice}: {exc}; its gunicorn's log:\n{log}") from exc
        return cpu_per_request(target, path, secs)
    finally:
        target.stop()


def rounds(args, static: str, sse: str, env: dict, receiver: harness.Upstream) -> dict:
    """Every variant's runs: {name: {"small": [...], "sse": [...]}}, alternating within each round."""
    traced = {**env, **tracing.variant_env("on, 100%", receiver)}
    order = [*LABELS, AGAIN]
    runs = {name: {"small": [], "sse": []} for name in order}
    for rep in range(args.repeat):
        for name in order if rep % 2 == 0 else order[::-1]:
            choice = "off" if name == AGAIN else name
            print(f"[{rep + 1}/{args.repeat}] {name}", flush=True)
            variant_env = traced if name == "tracing" else env
            runs[name]["small"].append(measure(choice, static, "/b/small", args.seconds, variant_env))
            runs[name]["sse"].append(measure(choice, sse, SSE_PATH, args.seconds, variant_env))
    return runs


def summarize(runs: dict) -> dict:
    """Medians, min-max and deltas against ``off``: per small GET, per stream, per unit."""
    base = {kind: statistics.median(runs["off"][kind]) for kind in ("small", "sse")}
    table = {}
    for name, kinds in runs.items():
        row = {}
        for kind, values in kinds.items():
            median = statistics.median(values)
            row[kind] = {"median_us": median, "min_us": min(values), "max_us": max(values),
                         "delta_us": median - base[kind]}
        row["sse"]["per_unit_us"] = row["sse"]["median_us"] / EVENTS
        row["sse"]["delta_per_unit_us"] = row["sse"]["delta_us"] / EVENTS
        table[name] = row
    return table


def print_table(table: dict, args) -> None:
    print(f"\nProxy CPU, one gevent worker on CPU {harness.PROXY_CPU}, 50 connections; median of {args.repeat} "
          f"alternating runs of {args.seconds:g} s (min-max in brackets); SSE: {EVENTS} events per stream")
    print(f"{'variant':28} {'small GET us/req':>25} {'delta':>7}   {'SSE us/stream':>25} {'us/unit':>8} {'delta':>7}")
    for name, row in table.items():
        small, sse = row["small"], row["sse"]
        print(f"{LABELS.get(name, name):28} {small['median_us']:7.1f} [{small['min_us']:6.1f}-{small['max_us']:6.1f}]"
              f" {small['delta_us']:+7.1f}   {sse['median_us']:7.1f} [{sse['min_us']:6.1f}-{sse['max_us']:6.1f}]"
              f" {sse['per_unit_us']:8.2f} {sse['delta_us']:+7.1f}")
    print(f"noise: '{AGAIN}' is the same app as 'off', run at the other end of every round")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def sources() -> dict[str, str]:
    """forkproxy's sources, each file's digest: each variant's worker imports them anew, so an edit during the
    run would compare variants of different code; the run names the files that changed."""
    return {str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in sorted((ROOT / "forkproxy").rglob("*.py"))}


def write_json(runs: dict, table: dict, args, changed: list[str]) -> Path:
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"capabilities-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "args": vars(args), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                                "events_per_stream": EVENTS, "labels": LABELS, "runs": runs, "table": table,
                                "forkproxy_files_changed_during_run": changed}, indent=1))
    return path


def main() -> None:
    from forkproxy.limits.paths import default_path

    args = alternating_args(__doc__, 3)  # 3 rounds of 3 s: about 7 minutes on 2 cores
    html = Path(tempfile.mkdtemp(prefix="capabilities-"))
    port = free_port()
    static, sse, receiver = static_upstream(port, html), harness.Upstream("sse"), harness.Upstream("tracing")
    local = Path(default_path()).parent / f"forkproxy-bench-{os.getpid()}.lmdb"  # /dev/shm, as ``local`` is
    before = sources()
    try:
        runs = rounds(args, f"http://127.0.0.1:{port}", sse.url, {STORE: f"local:{local}"}, receiver)
    finally:
        static.stop()
        sse.stop()
        receiver.stop()
        shutil.rmtree(html, ignore_errors=True)
        harness.remove_lmdb(local)
    after = sources()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    table = summarize(runs)
    print_table(table, args)
    if changed:
        print(f"WARNING: forkproxy changed during the run, so the variants ran different code: {', '.join(changed)}")
    print(f"\nraw results: {write_json(runs, table, args, changed)}")


if __name__ == "__main__":
    main()
