"""forkproxy beside its peers and its ceilings, on loopback, in one run.

Python targets run with one worker pinned to CPU 0; the load generator and
the upstreams run on CPU 1. Targets alternate within each repetition and the
spread (min-max over repetitions) is printed beside each median, because two
shared cores are noisy. Proxy CPU time per request is the steadiest figure.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchkit.harness import (CLK, LOAD_CPU, ROOT, Process, Target, cpu_ticks, free_port, held, mem_kib, pin,
                                      post_script, static_upstream, wait_port, wrk)
from scripts.benchkit.llm import LLMWorkloads

ALL_TARGETS = ["direct", "nginx", "empty", "floor", "forkproxy", "naive", "werkzeug", "proxypy", "litellm"]
LLM_ONLY = {"litellm"}  # an LLM gateway: measured on the chat-completion workloads only
NO_LLM = {"empty", "floor"}  # the ceilings of the server and of the design


# -- workloads --------------------------------------------------------------------

def http_workloads(target: Target, secs: float, post: Path) -> dict:
    pids = target.pids() if target.name != "direct" else []
    out = {}
    for name, path, conns, script in (("small", "/b/small", 50, None), ("big", "/b/big", 10, None),
                                      ("post", "/b/post", 50, post)):
        wrk(target.url + path, conns, 1, script)  # warm the pools
        before = cpu_ticks(pids)
        result = wrk(target.url + path, conns, secs, script)
        spent = cpu_ticks(pids) - before
        result["cpu_us_per_req"] = spent / CLK * 1e6 / result["requests"] if pids and result["requests"] else None
        out[name] = result
    out["peak_mib"] = mem_kib(pids, "VmHWM") / 1024 if pids else None
    return out


def sse_client(*args: str, timeout: float = 300) -> str:
    cmd = pin(LOAD_CPU) + [sys.executable, "-m", "scripts.benchkit.sse", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout).stdout


def sse_workloads(target: Target, hold_streams: int, hold_targets: set[str]) -> dict:
    out = {}
    for streams, events, interval in ((1, 50, 20), (500, 10, 500)):
        res = json.loads(sse_client("latency", target.url, str(streams), str(events), str(interval)))
        out[f"sse_{streams}"] = res
    if target.name in hold_targets and hold_streams:
        out["hold"] = held("sse", target, hold_streams, 4)
        if target.name == "floor":  # its own idle stream, no upstream: the server's share of one
            out["idle"] = held("sse", target, hold_streams, 4, "/b/idle")
    return out


# -- the run ------------------------------------------------------------------------

def median_spread(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


METRICS = [
    ("small req/s", lambda r: r["http"]["small"]["rps"]),
    ("small p50 ms", lambda r: r["http"]["small"]["p50_ms"]),
    ("small p99 ms", lambda r: r["http"]["small"]["p99_ms"]),
    ("CPU us/req", lambda r: r["http"]["small"]["cpu_us_per_req"]),
    ("1 MiB GET MB/s", lambda r: r["http"]["big"]["mb_per_s"]),
    ("64 KiB POST req/s", lambda r: r["http"]["post"]["rps"]),
    ("SSE p50 ms @1", lambda r: r["sse"]["sse_1"]["p50_ms"]),
    ("SSE p50 ms @500", lambda r: r["sse"]["sse_500"]["p50_ms"]),
    ("KiB/open stream", lambda r: r["sse"].get("hold", {}).get("kib_per_stream")),
    ("KiB/idle stream", lambda r: r["sse"].get("idle", {}).get("kib_per_stream")),
    ("peak MiB", lambda r: r["http"]["peak_mib"]),
    ("errors", lambda r: sum(w["errors"] for w in (r["http"]["small"], r["http"]["big"], r["http"]["post"]))),
]
LLM_METRICS = [
    (f"{label} {name}", lambda r, w=workload, f=field: r["llm"][w][f])
    for label, workload in (("chat", "buffered"), ("stream", "streamed"))
    for name, field in (("r/s", "rps"), ("r/s/core", "per_core_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"))
] + [("TTFC p50 ms", lambda r: r["llm"]["ttfc"]["p50_ms"])]


def _get(fn, run):
    try:
        return fn(run)
    except (KeyError, TypeError):
        return None


def summarize(runs: dict[str, list[dict]]) -> dict:
    table = {}
    for target, reps in runs.items():
        row = {name: median_spread([_get(fn, r) for r in reps]) for name, fn in METRICS + LLM_METRICS}
        direct = runs.get("direct") or []
        added = [(f"SSE added p50 ms @{n}", lambda x, n=n: x["sse"][f"sse_{n}"]["p50_ms"]) for n in ("1", "500")]
        for name, fn in added + [("TTFC added ms", LLM_METRICS[-1][1])]:
            base = [v for v in (_get(fn, r) for r in direct) if v is not None]
            if base:
                row[name] = median_spread([v - statistics.median(base) if v is not None else None
                                           for v in (_get(fn, r) for r in reps)])
        two = [r["hold2"] for r in reps if "hold2" in r]
        if two:
            row["2 workers"] = two[0]
        table[target] = row
    return table


def fmt(cell: dict) -> str:
    if cell["median"] is None:
        return "-"
    m, lo, hi = cell["median"], cell["min"], cell["max"]
    digits = 0 if abs(m) >= 100 else 2
    spread = "" if lo == hi else f" ({lo:.{digits}f}-{hi:.{digits}f})"
    return f"{m:,.{digits}f}{spread}"


def print_table(table: dict) -> None:
    cols = [name for name, _ in METRICS if name not in ("SSE p50 ms @1", "SSE p50 ms @500")]
    cols[6:6] = ["SSE added p50 ms @1", "SSE added p50 ms @500"]
    print_rows(table, cols)
    fp = table.get("forkproxy")
    if not fp:
        return
    print("\nforkproxy as a ratio of each target (same run, medians):")
    for target, row in table.items():
        if target == "forkproxy":
            continue
        parts = []
        for c in ("small req/s", "1 MiB GET MB/s", "64 KiB POST req/s"):  # each: higher is better
            a, b = fp[c]["median"], row[c]["median"]
            if a and b:
                parts.append(f"{c} x{a / b:.2f}")
        print(f"  vs {target}: " + ", ".join(parts))
    empty = table.get("empty", {}).get("CPU us/req", {}).get("median")
    own = fp["CPU us/req"]["median"]
    if empty and own:
        print(f"  forkproxy's own CPU per request (minus the empty app's): {own - empty:.0f} us "
              f"vs the empty app's {empty:.0f} us (ratio {(own - empty) / empty:.2f})")
    floor = table.get("floor", {}).get("CPU us/req", {}).get("median")
    if floor and own:
        print(f"  the design's floor (gunicorn + the urllib3 pool exchange alone): {floor:.0f} us per small GET; "
              f"forkproxy's rules, IDs and hooks add {own - floor:.0f} us to it")
    print_llm_table(table)
    print_goals(table)


def print_llm_table(table: dict) -> None:
    rows = {t: row for t, row in table.items() if row.get("chat r/s", {}).get("median") is not None}
    if not rows:
        return
    cols = [name for name, _ in LLM_METRICS] + ["TTFC added ms"]
    print("\nchat completions (buffered ~1 KiB; streamed 50 chunks; 50 connections; TTFC sequential):")
    print_rows(rows, cols)


def print_rows(table: dict, cols: list[str]) -> None:
    """``table`` as a Markdown table of ``cols``, one row per target."""
    print("| target | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for target, row in table.items():
        print(f"| {target} | " + " | ".join(fmt(row[c]) if c in row else "-" for c in cols) + " |")


def _median(table: dict, target: str, col: str) -> float | None:
    return table.get(target, {}).get(col, {}).get("median")


def print_goals(table: dict) -> None:
    """The ratios issue #15 set, each beside its target."""
    m = functools.partial(_median, table)
    goals = []

    def goal(label: str, value: float, want: str, ok) -> None:
        goals.append(f"  {label}: {value:.2f} (target {want}) {'met' if ok(value) else 'NOT met'}")

    def ratio(label: str, a: float | None, b: float | None, want: str, ok) -> None:
        if a is not None and b:
            goal(label, a / b, want, ok)
    for who in ("forkproxy", "floor"):  # the floor: how far the design itself goes
        ratio(f"64 KiB POST req/s, {who} / proxy.py", m(who, "64 KiB POST req/s"),
              m("proxypy", "64 KiB POST req/s"), ">= 1.2", lambda v: v >= 1.2)
        ratio(f"small GET req/s, {who} / naive", m(who, "small req/s"), m("naive", "small req/s"),
              ">= 2", lambda v: v >= 2)
        own, empty = m(who, "CPU us/req"), m("empty", "CPU us/req")
        if own and empty:
            ratio(f"own CPU per small GET / the empty app's, {who}", own - empty, empty, "<= 1.2",
                  lambda v: v <= 1.2)
    for col, want in (("SSE added p50 ms @500", 0.08), ("KiB/open stream", 16)):
        for who in ("forkproxy", "floor"):
            v = m(who, col)
            if v is not None:
                goal(f"{col}, {who}", v, f"<= {want}", lambda v, want=want: v <= want)
    two = table.get("forkproxy", {}).get("2 workers")
    if two:
        failed = two["asked"] - two["streams"]
        goals.append(f"  {two['asked']:,} streams on 2 workers: {two['streams']:,} open, {failed} failed, "
                     f"{two['kib_per_stream'] or 0:.1f} KiB/stream (target: none failed) "
                     f"{'met' if not failed else 'NOT met'}")
    ratio("chat r/s per core, forkproxy / LiteLLM", m("forkproxy", "chat r/s/core"), m("litellm", "chat r/s/core"),
          ">= 10", lambda v: v >= 10)
    ratio("streamed r/s per core, forkproxy / LiteLLM", m("forkproxy", "stream r/s/core"),
          m("litellm", "stream r/s/core"), ">= 10", lambda v: v >= 10)
    ratio("TTFC added, forkproxy / LiteLLM", m("forkproxy", "TTFC added ms"), m("litellm", "TTFC added ms"),
          "<= 0.1", lambda v: v <= 0.1)
    if goals:
        print("\nissue #15's targets (same run, medians; the floor's lines: how far the design itself goes):")
        print("\n".join(goals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--hold", type=int, default=5000, help="idle SSE streams held per target (0 = skip)")
    parser.add_argument("--hold2", type=int, default=10000, help="SSE streams held by forkproxy on 2 workers (0 = skip)")
    parser.add_argument("--hold-targets", default="nginx,floor,forkproxy,naive",
                        help="targets that hold streams (werkzeug buffers whole streams; proxy.py --threaded "
                             "spends a thread on each)")
    parser.add_argument("--no-sse", action="store_true")
    parser.add_argument("--no-llm", action="store_true", help="skip the chat-completion workloads")
    parser.add_argument("--ttfc", type=int, default=200, help="sequential streamed completions timed to the first chunk")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    if "nginx" in targets and not shutil.which("nginx"):
        print("note: nginx is not installed; skipping the nginx targets")
        targets.remove("nginx")
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk); scripts/bench installs it when run as root")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    post = post_script(tmp)
    up_port, sse_port = free_port(), free_port()
    if not shutil.which("nginx"):
        sys.exit("the static upstream needs nginx (Debian package nginx)")
    (tmp / "html").mkdir()
    upstream = static_upstream(up_port, tmp / "html")
    sse_up = Process()
    sse_up.spawn([sys.executable, "-m", "scripts.benchkit.sse", "serve", str(sse_port)], LOAD_CPU)
    wait_port(sse_port)
    llm = LLMWorkloads(tmp, args) if not args.no_llm else None
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    try:
        for rep in range(args.repeat):
            order = targets if rep % 2 == 0 else targets[::-1]
            for name in order:
                if name in LLM_ONLY:
                    if llm is not None and (got := llm.run(name, rep)) is not None:
                        runs[name].append({"llm": got})
                    continue
                print(f"[{rep + 1}/{args.repeat}] {name}: http", flush=True)
                target = Target(name, f"http://127.0.0.1:{up_port}")
                try:
                    result = {"http": http_workloads(target, args.seconds, post)}
                finally:
                    target.stop()
                if llm is not None and name not in NO_LLM:
                    result["llm"] = llm.run(name, rep)
                if not args.no_sse and name != "empty":  # the empty app streams nothing
                    print(f"[{rep + 1}/{args.repeat}] {name}: sse", flush=True)
                    target = Target(name, f"http://127.0.0.1:{sse_port}")
                    try:
                        result["sse"] = sse_workloads(target, args.hold, set(args.hold_targets.split(",")))
                    finally:
                        target.stop()
                runs[name].append(result)
                (tmp / "partial.json").write_text(json.dumps(runs))
        if not args.no_sse and args.hold2 and "forkproxy" in targets:
            print(f"forkproxy, 2 workers: holding {args.hold2} streams", flush=True)
            target = Target("forkproxy", f"http://127.0.0.1:{sse_port}", workers=2)
            try:
                runs["forkproxy"][0]["hold2"] = {**held("sse", target, args.hold2, 4), "asked": args.hold2}
            finally:
                target.stop()
    finally:
        upstream.stop()
        sse_up.stop()
        if llm is not None:
            llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    runs = {name: reps for name, reps in runs.items() if reps}
    table = summarize(runs)
    Path(args.out).mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"when": stamp, "args": vars(args), "cpus": os.cpu_count(), "runs": runs, "table": table}
    path = Path(args.out) / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    print()
    print_table(table)
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
