"""How forkproxy scales: with a second worker, and with open streams: ``scripts/bench --scale``.

Issue #30's fifth target: 2 workers reach 1.8 times one worker's requests/s,
and the cost of a request stays flat from 1 to 10,000 open streams.

A. Workers. Two workloads, each through the real gunicorn with gevent workers:

- the small GET: 100 bytes from the static nginx upstream (``/b/small``, as
  ``scripts/bench`` runs it), through ``forkproxy.app``;
- the chat request: a non-streaming chat completion POST through
  ``examples/llm_gateway.py`` as shipped, limits off (``llm.EXAMPLE_ENV``), to
  the fake OpenAI upstream (``scripts/benchkit/openai.py``), as ``--llm`` runs it.

One worker and two workers alternate within each of ``--repeat`` rounds (the
order reversed every other round); each run is 1 s of warm-up, then wrk with
``--conns`` (64) connections for ``--seconds``. Pinning: wrk (one thread) and
the upstream always run on CPU 1 (``LOAD_CPU``). One worker runs on CPU 0
(``PROXY_CPU``), as in every other bench. Two workers are not pinned: both may
run on every CPU this bench may use, so the kernel puts them where there is
room; pinning both to CPU 0 would measure one core twice.

Per run: req/s; the CPU per request of the workers together (utime+stime of
their /proc stat, the gunicorn master left out) and how many cores that kept
busy (req/s x CPU per request); the CPU per request of wrk (this process's
children's rusage across the run: wrk is the only child that ends in it) and
of the upstream (its processes' /proc stat); how busy each CPU was over the
load (/proc/stat: on a shared machine, others' load shows here); and, with two
workers, each one's share of their CPU.

How to read it: one worker is bound by its own core, so its req/s is about
1e6 / P1 (P1: µs of worker CPU per request). Two workers share the 2 cores
with wrk and the upstream, whose cost W + U per request does not shrink, so
the most they can reach is 2e6 / (P2 + W + U) req/s, that is
2 P1 / (P2 + W + U) times one worker: with P2 = P1, 1.8 needs W + U <= P1 / 9.
The bench prints this ceiling, from CPU costs alone, beside the ratio it got: a
ratio near its ceiling says the proxy scales and the machine is full, and
a ceiling below 1.8 is the arithmetic of why 1.8 is out of reach here. Where
one worker got less than 0.95 of its core (the workers' cores column), others
were on its CPU, and the bench says the ratio reads high.

B. Open streams. One worker on CPU 0, a fresh one for each N of ``--streams``
(1, 100, 1,000, 5,000, 10,000): the ``sse`` holder (on CPU 1) opens N idle
event streams through the worker (``/b/hold`` on the SSE upstream of
``scripts/benchkit/sse.py``, which sends one event and then nothing) and says
how many got their first event; with them open, wrk runs the small GET with 16
connections for ``--seconds`` (after 1 s of warm-up), then the ``sse``
latency client runs 20 live streams of 20 events 50 ms apart. The worker is
``forkproxy.app`` with one hook: ``pick_upstream`` sends ``/b/hold`` and
``/b/sse`` to the SSE upstream and the rest to nginx (one short call per
request, the same at every N). ``FORKPROXY_WORKER_CONNECTIONS`` is raised to
the largest N + 1,000 for every N, so the held streams never fill the worker.

Per N: req/s, worker CPU µs per small GET, its p50/p99 (wrk --latency: a
closed loop that keeps the worker busy, so p50 is about connections / req/s
and p99 shows the tail beyond that), the worker's RSS growth per open stream
(over its RSS after a warm-up; shown from 100 streams, below which RSS's page
granularity swamps them), what the worker adds to a live stream's event
latency (p50/p99, against the same client run direct to the SSE upstream
just after), how busy each CPU was, and the worker's open files: idle after
the warm-up (its pooled upstream connections included), while holding (2 per
stream: client and upstream, less the pooled ones the streams took), after the
load, and after the holder is killed. Flat is the goal: the last line gives
the CPU per request at the largest N over that at 1.

Releasing: a held stream is idle, so the worker notices its client has gone
only when it next writes to it (``sse_heartbeat_secs`` is off by default) or
when the upstream has been silent for ``stream_idle_timeout`` (60 s). So
after each N but the last the bench waits 3 s (the table says the files are
not back), starts a fresh worker for the next N (RSS per stream is then not
helped by memory the last N freed), and stops the old one with
``FORKPROXY_GRACEFUL_TIMEOUT=1``; after the largest N it waits up to
``--release-wait`` (70 s) for the worker's files to drop to their idle
count: a worker that keeps anything per stream it let go fails that check.
The streams are measured well inside those 60 s.

Files: one worker holding N streams needs 2N of them and a few more
(``FD_RESERVE``). ``scripts/bench`` raises ``ulimit -n`` to 65536, or to the
hard limit where that is lower; N is cut to (limit - 200) / 2 where the limit
leaves no room (a hard limit of 20,000 holds 9,900), and the table says so.

The defaults take about 4 minutes; ``--quick`` (1 round of 2 s, N up to
1,000, 3 s release wait) about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchkit.harness import (CLK, LOAD_CPU, PROXY_CPU, ROOT, Process, Target, Upstream, client, cpu_ticks,
                                      free_port, mem_kib, start_holder, static_upstream, wrk)
from scripts.benchkit.llm import EXAMPLE_ENV, lua
from scripts.benchkit.openai import BODY

STREAMS_UPSTREAM = "BENCH_STREAMS_UPSTREAM"  # in the worker: where /b/hold and /b/sse go
LIVE = ("20", "20", "50")  # the latency client: streams, events each, ms between events
HOLD_SECONDS = 600  # the holder's own limit; it is killed as soon as its N is measured
SHORT_RELEASE = 3  # seconds to wait for a released worker's files, but after the largest N (``--release-wait``)


def _app():
    """``forkproxy.app`` with streams sent to their own upstream (imported in the worker, after gevent's patching)."""
    from forkproxy.envproxy import from_env

    proxy = from_env()
    streams = os.environ[STREAMS_UPSTREAM]

    @proxy.hook
    def pick_upstream(req):
        return streams if req.path in ("/b/hold", "/b/sse") else proxy.upstream
    return proxy


app = _app() if STREAMS_UPSTREAM in os.environ else None


class _Target(Target):
    """``harness.Target`` with what it cannot be told: the CPUs its gunicorn may use, and another app to serve.

    Both go to ``spawn``, which ``Target`` calls with ``PROXY_CPU`` and its app as
    the command's last word (as ``capabilities.CapabilityTarget`` swaps it).
    """

    def __init__(self, name: str, upstream: str, workers: int = 1, env: dict | None = None,
                 cpus: str = PROXY_CPU, app: str | None = None) -> None:
        self.cpus, self.app = cpus, app
        super().__init__(name, upstream, workers, env)

    def spawn(self, cmd: list[str], cpu: str, env: dict | None = None) -> None:
        super().spawn(cmd[:-1] + [self.app] if self.app else cmd, self.cpus, env)

    def workers(self) -> list[int]:
        return self.pids()[1:]  # the master's children


# -- readings ------------------------------------------------------------------------

def cpu_times() -> dict[str, tuple[int, int]]:
    """Each CPU's (busy, total) ticks since boot, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields[:8]]
            out[name[3:]] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))  # all but idle and iowait
    return out


def busy(before: dict, after: dict) -> dict[str, float]:
    """Each CPU's busy share (%) between two ``cpu_times``."""
    return {cpu: 100 * (after[cpu][0] - before[cpu][0]) / max(after[cpu][1] - before[cpu][1], 1) for cpu in after}


def children_cpu() -> float:
    """CPU seconds of this process's ended children (wrk, once its run returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def loaded(url: str, conns: int, secs: float, workers: list[int], upstream: list[int],
           script: Path | None = None) -> dict:
    """wrk against ``url`` after 1 s of warm-up, with the CPU it cost each side and each CPU's load."""
    wrk(url, conns, 1, script)
    each, up, own, cpus = [cpu_ticks([pid]) for pid in workers], cpu_ticks(upstream), children_cpu(), cpu_times()
    result = wrk(url, conns, secs, script)
    spent = [cpu_ticks([pid]) - t for pid, t in zip(workers, each)]
    per_req = 1e6 / max(result["requests"], 1)
    result.update(proxy_us=sum(spent) / CLK * per_req, wrk_us=(children_cpu() - own) * per_req,
                  upstream_us=(cpu_ticks(upstream) - up) / CLK * per_req, cpu_busy=busy(cpus, cpu_times()),
                  worker_share=[100 * s / max(sum(spent), 1) for s in spent])
    return result


# -- A: one worker, two workers ---------------------------------------------------------

def all_cpus() -> str:
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


def scaling(args, static: Process, static_url: str, mock: Upstream, tmp: Path) -> dict:
    """{workload: {"1": [runs], "2": [runs]}}, one and two workers alternating within each round."""
    chat = lua(BODY, tmp / "chat.lua")
    workloads = {
        "small GET": lambda n: (_Target("forkproxy", static_url, n, cpus=PROXY_CPU if n == 1 else all_cpus()),
                                "/b/small", None, static),
        "chat": lambda n: (_Target("llm-example", mock.url, n, {**EXAMPLE_ENV, "LLM_UPSTREAM": mock.url},
                                   cpus=PROXY_CPU if n == 1 else all_cpus()), "/v1/chat/completions", chat, mock),
    }
    runs = {name: {"1": [], "2": []} for name in workloads}
    for rep in range(args.repeat):
        for name, start in workloads.items():
            for n in (1, 2) if rep % 2 == 0 else (2, 1):
                print(f"[{rep + 1}/{args.repeat}] {name}, {n} worker{'s' * (n > 1)}", flush=True)
                target, path, script, upstream = start(n)
                try:
                    if len(target.workers()) != n:
                        raise RuntimeError(f"{name}: {len(target.workers())} workers running, not {n}")
                    runs[name][str(n)].append(loaded(target.url + path, args.conns, args.seconds,
                                                     target.workers(), upstream.pids(), script))
                finally:
                    target.stop()
    return runs


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_scaling(runs: dict, args) -> None:
    print(f"\nA. One worker (CPU {PROXY_CPU}) and two (unpinned); wrk and the upstream on CPU {LOAD_CPU}; "
          f"{args.conns} connections, median of {args.repeat} alternating runs of {args.seconds:g} s (min-max)\n")
    print("| workload | workers | req/s | 2w/1w | proxy CPU µs/req | workers' cores | wrk µs/req | upstream µs/req "
          "| CPU busy % | worker split % (each run) | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ceilings = []
    for name, by_n in runs.items():
        one = med(by_n["1"], "rps")
        for n, reps in by_n.items():
            rps = [r["rps"] for r in reps]
            ratio = f"{statistics.median(rps) / one:.2f}" if n == "2" else ""
            cores = statistics.median(r["rps"] * r["proxy_us"] / 1e6 for r in reps)
            cpus = " / ".join(f"{cpu}: {statistics.median(r['cpu_busy'][cpu] for r in reps):.0f}"
                              for cpu in reps[0]["cpu_busy"])
            split = ", ".join("/".join(f"{s:.0f}" for s in r["worker_share"]) for r in reps) if n == "2" else ""
            print(f"| {name} | {n} | {statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) | {ratio} "
                  f"| {med(reps, 'proxy_us'):.1f} | {cores:.2f} | {med(reps, 'wrk_us'):.1f} "
                  f"| {med(reps, 'upstream_us'):.1f} | {cpus} | {split} | {sum(r['errors'] for r in reps)} |")
        ceilings.append(ceiling_line(name, by_n))
    print("\nThe ceiling of two workers sharing 2 cores with wrk and the upstream, 2 P1 / (P2 + W + U), against "
          "what they reached (P1, P2: proxy µs/req of one worker, of two; W, U: wrk's, the upstream's):")
    print("\n".join(ceilings))


def ceiling_line(name: str, by_n: dict) -> str:
    """One workload's ceiling ratio from CPU costs alone, so that load from others on the machine cancels out."""
    one, two = by_n["1"], by_n["2"]
    p1, p2, w, u = med(one, "proxy_us"), med(two, "proxy_us"), med(two, "wrk_us"), med(two, "upstream_us")
    line = (f"  {name}: 2 x {p1:.1f} / ({p2:.1f} + {w:.1f} + {u:.1f}) = {2 * p1 / (p2 + w + u):.2f}x; "
            f"reached {med(two, 'rps') / med(one, 'rps'):.2f}x (1.8x needs W + U <= {2 * p1 / 1.8 - p2:.1f} µs/req, "
            f"they cost {w + u:.1f})")
    core = med(one, "rps") * p1 / 1e6
    if core < 0.95:
        line += f"; NOTE: one worker used {core:.2f} of its core (others on the machine?), so 2w/1w reads high"
    return line


# -- B: one worker holding N open streams ------------------------------------------------

FD_RESERVE = 200  # the worker's own files, wrk's connections, the pools and the live streams


def stream_room() -> int:
    """The most streams one worker can hold: 2 files each (client, upstream) under its RLIMIT_NOFILE."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE) // 2


def back_to(pid: int, idle: int, timeout: float) -> tuple[int, float | None]:
    """The worker's open files once down to ``idle`` or after ``timeout``; and how long that took (None: not)."""
    started = time.monotonic()
    while (now := open_files(pid)) > idle and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return now, (time.monotonic() - started if now <= idle else None)


def with_streams(n: int, args, static: Process, static_url: str, sse: Upstream, env: dict, release: float) -> dict:
    """The small GET and live-stream latency through a fresh worker while ``n`` idle streams are held open."""
    target = _Target("forkproxy", static_url, env=env, app="scripts.benchkit.scale:app")
    holder = None
    try:
        [worker] = target.workers()
        wrk(target.url + "/b/small", args.stream_conns, 1)  # first requests' allocations: not the streams'
        client("sse", "latency", target.url, LIVE[0], "1", "1")  # and the pools' connections: part of idle
        time.sleep(0.5)  # the worker closes wrk's connections
        idle_fds, idle_rss = open_files(worker), mem_kib([worker])
        started = time.monotonic()
        holder, opened = start_holder("sse", target, n, HOLD_SECONDS)
        open_s = time.monotonic() - started
        time.sleep(1)
        rss, held_fds = mem_kib([worker]), open_files(worker)
        result = loaded(target.url + "/b/small", args.stream_conns, args.seconds, [worker], static.pids())
        live = client("sse", "latency", target.url, *LIVE, timeout=120)
        live_direct = client("sse", "latency", sse.url, *LIVE, timeout=120)  # beside it in time: the same noise
        result.update(streams=n, opened=opened, open_s=open_s, idle_fds=idle_fds, held_fds=held_fds,
                      fds_after_load=open_files(worker), rss_mib=rss / 1024, live=live, live_direct=live_direct,
                      kib_per_stream=(rss - idle_rss) / opened if opened else None)
        holder.kill()
        holder.wait(30)
        result["released_fds"], result["released_s"] = back_to(worker, idle_fds, release)
        result["release_wait"] = release
        return result
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(30)
        target.stop()


def curve(args, static: Process, static_url: str, sse: Upstream) -> dict:
    asked = [int(n) for n in args.streams.split(",")]
    room = stream_room()
    counts = [min(n, room) for n in asked]
    env = {STREAMS_UPSTREAM: sse.url, "FORKPROXY_WORKER_CONNECTIONS": str(max(10000, max(counts) + 1000)),
           "FORKPROXY_GRACEFUL_TIMEOUT": "1"}  # stop at once: a stream whose client left is still open (docstring)
    points = []
    for i, n in enumerate(counts):
        print(f"holding {n:,} streams", flush=True)
        release = args.release_wait if i == len(counts) - 1 else SHORT_RELEASE
        points.append({"asked": asked[i], **with_streams(n, args, static, static_url, sse, env, release)})
    return {"points": points, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "room": room}


def print_curve(result: dict, args) -> None:
    print(f"\nB. One worker on CPU {PROXY_CPU} holding N idle SSE streams (holder, upstreams and wrk on "
          f"CPU {LOAD_CPU}); small GET with {args.stream_conns} connections for {args.seconds:g} s; live streams: "
          f"{LIVE[0]} x {LIVE[1]} events {LIVE[2]} ms apart, added over the same client direct (run just after)\n")
    print("| open streams | opened (s) | req/s | CPU µs/req | p50 ms | p99 ms | KiB/stream | RSS MiB "
          "| live added p50 / p99 ms | live events | CPU busy % | worker fds: idle / held / after load / released |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in result["points"]:
        live, direct = p["live"], p["live_direct"]
        # below 100 streams the page and arena granularity of RSS swamps them
        per_stream = f"{p['kib_per_stream']:.1f}" if p["kib_per_stream"] is not None and p["streams"] >= 100 else "-"
        released = (f"{p['released_fds']} (in {p['released_s']:.1f} s)" if p["released_s"] is not None
                    else f"{p['released_fds']} (not back)")
        cpus = " / ".join(f"{cpu}: {v:.0f}" for cpu, v in p["cpu_busy"].items())
        print(f"| {p['streams']:,} | {p['opened']:,} ({p['open_s']:.1f} s) | {p['rps']:,.0f} | {p['proxy_us']:.1f} "
              f"| {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | {per_stream} | {p['rss_mib']:.0f} "
              f"| {live['p50_ms'] - direct['p50_ms']:.3f} / {live['p99_ms'] - direct['p99_ms']:.3f} "
              f"| {live['events']}/{live['expected']} | {cpus} "
              f"| {p['idle_fds']} / {p['held_fds']} / {p['fds_after_load']} / {released} |")
    first, last = result["points"][0], result["points"][-1]
    print(f"\nCPU per request at {last['streams']:,} open streams over that at {first['streams']:,}: "
          f"{last['proxy_us'] / first['proxy_us']:.2f}x ({first['proxy_us']:.1f} -> {last['proxy_us']:.1f} µs; "
          f"flat is the goal); p99 at {last['streams']:,}: {last['p99_ms']:.3f} ms; errors: "
          f"{sum(p['errors'] for p in result['points'])}")
    for p in result["points"]:
        if p["streams"] < p["asked"]:
            print(f"NOTE: {p['asked']:,} streams asked, {p['streams']:,} held: RLIMIT_NOFILE {result['nofile']} "
                  f"leaves one worker room for ({result['nofile']} - {FD_RESERVE}) / 2 streams")
        if p["opened"] < p["streams"]:
            print(f"WARNING: only {p['opened']:,} of {p['streams']:,} streams opened")
    kept = [p for p in result["points"] if p["released_s"] is None]
    if any(p["release_wait"] <= SHORT_RELEASE for p in kept):
        print(f"(files not back within {SHORT_RELEASE} s: a held stream whose client left stays open until its "
              f"upstream writes or stream_idle_timeout ends it; see the docstring)")
    for p in kept:
        if p["release_wait"] > SHORT_RELEASE:
            print(f"WARNING: the worker still has {p['released_fds']} files open (idle: {p['idle_fds']}), "
                  f"{p['release_wait']:g} s after the client of its {p['streams']:,} streams left")


# -- the run ------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of one worker vs two")
    parser.add_argument("--seconds", type=int, default=4, help="each load run, after 1 s of warm-up")
    parser.add_argument("--conns", type=int, default=64, help="wrk connections for one worker vs two")
    parser.add_argument("--stream-conns", type=int, default=16, help="wrk connections beside the open streams")
    parser.add_argument("--streams", default="1,100,1000,5000,10000", help="open stream counts, comma-separated")
    parser.add_argument("--release-wait", type=float, default=70,
                        help="seconds to wait, after the largest N, for the worker to close the streams it held")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, streams 1,100,1000: about a minute")
    parser.add_argument("--json", help="where the raw results go (default: bench-results/scale-<time>.json)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.seconds, args.streams, args.release_wait = 1, 2, "1,100,1000", SHORT_RELEASE
    missing = [tool for tool in ("nginx", "wrk", "taskset") if not shutil.which(tool)]
    if missing:
        sys.exit(f"needs {', '.join(missing)}")
    return args


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    (tmp / "html").mkdir()
    port = free_port()
    static = static_upstream(port, tmp / "html")
    static_url = f"http://127.0.0.1:{port}"
    mock = sse = None
    started = time.monotonic()
    try:
        mock, sse = Upstream("openai"), Upstream("sse")
        report = {"scaling": scaling(args, static, static_url, mock, tmp),
                  "streams": curve(args, static, static_url, sse)}
    finally:
        for up in (static, mock, sse):
            if up is not None:
                up.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.json) if args.json else ROOT / "bench-results" / f"scale-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"when": stamp, "args": vars(args), "cpus": os.cpu_count(),
                                "seconds_taken": time.monotonic() - started, **report}, indent=1))
    print_scaling(report["scaling"], args)
    print_curve(report["streams"], args)
    print(f"\nraw results: {path} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
