"""The LLM-gateway workloads, with the LiteLLM proxy among the targets: ``scripts/bench --llm``.

An OpenAI-compatible mock (``scripts/benchkit/openai.py``) on CPU 1 answers
``POST /v1/chat/completions`` at once: a ~1 KiB completion, or 50 streamed
chunks plus usage. Each target runs one worker pinned to CPU 0 (wrk and the
timing client on CPU 1):

- ``direct``: the mock itself; ``nginx``: proxy_pass; ``empty`` and ``floor``
  (asked for by name): the server's own cost and the design's floor
  (``scripts/benchkit/apps.py``; the empty app answers 100 bytes, no stream); ``forkproxy``:
  ``forkproxy.app`` under gunicorn.conf.py; ``llm-example`` (asked for by name):
  ``examples/llm_gateway.py`` as shipped, rate limits off; ``naive``: the bench's urllib3 proxy;
- ``litellm``: the LiteLLM proxy from PyPI in its own venv (``.venv-litellm``),
  started with its own command, ``litellm --config ... --num_workers 1`` (its
  docs: one Uvicorn worker per pod/core, scale by adding them), one
  ``openai/`` model pointing at the mock, offline: ``LITELLM_LOCAL_MODEL_COST_MAP``
  (the bundled cost map, no download), ``LITELLM_MODE=PRODUCTION``, logging at
  ERROR, no database, no callbacks. Skipped with one line where it cannot be
  installed.

Figures per workload (buffered completion, streamed completion; 50
connections): requests/s, requests per second of proxy CPU (one core's worth),
p50/p99; and the time to the first streamed chunk (sequential requests, each
on a new connection), with what the proxy adds over direct.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from scripts.benchkit.harness import (CLK, LOAD_CPU, PROXY_CPU, ROOT, Process, Target, Upstream, client, cpu_ticks,
                                      free_port, wait_port, wrk)
from scripts.benchkit.openai import API_KEY, BODY, STREAM_BODY

TARGETS = ["direct", "nginx", "forkproxy", "naive", "litellm"]
# examples/llm_gateway.py as shipped (auth, key swap, JSON, usage line), rate limits off as the peers run without them.
EXAMPLE_ENV = {"LLM_CLIENT_KEYS": API_KEY, "LLM_RPM": "0", "LLM_TPM": "0", "LLM_USAGE_LOG": "/dev/null"}
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_SPEC = os.environ.get("BENCH_LITELLM", "litellm[proxy]")


def ensure_litellm() -> tuple[Path | None, str]:
    """(the litellm command, "") or (None, why not)."""
    command = LITELLM_VENV / "bin" / "litellm"
    if command.exists():
        return command, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, capture_output=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", LITELLM_SPEC],
                       check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)
        return None, f"could not install {LITELLM_SPEC}: {str(exc).splitlines()[0][:200]}"
    return (command, "") if command.exists() else (None, "the litellm package has no litellm command")


class LiteLLM(Process):
    name = "litellm"

    def __init__(self, command: Path, upstream: str) -> None:
        super().__init__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.tmp / "config.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: bench-model\n"
            "    litellm_params:\n"
            "      model: openai/bench-model\n"
            "      api_key: sk-upstream\n"
            f"      api_base: {upstream}/v1\n"
            "litellm_settings:\n"
            "  drop_params: true\n"
            "  telemetry: false\n"
            "general_settings:\n"
            f"  master_key: {API_KEY}\n"
            "  disable_spend_logs: true\n")
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION", "LITELLM_LOG": "ERROR",
               "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True", "LITELLM_TELEMETRY": "False"}
        self.spawn([str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                    "--num_workers", "1"], PROXY_CPU, env)
        wait_port(self.port, timeout=120)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"litellm did not become ready: {(self.tmp / 'out.log').read_text()[-2000:]}")


def lua(body: bytes, path: Path) -> Path:
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n'
                    f"wrk.body = {json.dumps(body.decode())}\n")
    return path


def workloads(target: Process, scripts: dict, args) -> dict:
    pids = target.pids() if target.name != "direct" else []
    url = target.url + "/v1/chat/completions"
    out = {}
    for name, script in scripts.items():
        wrk(url, 50, 2, script)  # warm
        before = cpu_ticks(pids)
        result = wrk(url, 50, args.seconds, script)
        seconds = (cpu_ticks(pids) - before) / CLK
        result["per_core_s"] = result["requests"] / seconds if pids and seconds else None
        out[name] = result
    # The empty app never streams: no first chunk to time.
    out["ttfc"] = client("openai", "ttfc", target.url, str(args.ttfc), "1") if target.name != "empty" else None
    return out


class LLMWorkloads:
    """The chat-completion workloads against one mock upstream, for any target (``run`` gives them to each)."""

    def __init__(self, tmp: Path, args) -> None:
        self.args = args
        self.scripts = {"buffered": lua(BODY, tmp / "buffered.lua"), "streamed": lua(STREAM_BODY, tmp / "streamed.lua")}
        self.mock = Upstream("openai")
        self.litellm: Path | None = None
        self.skipped = ""

    def run(self, name: str, rep: int) -> dict | None:
        if name == "litellm":
            if self.litellm is None and not self.skipped:
                print("litellm: installing into .venv-litellm (once)", flush=True)
                self.litellm, self.skipped = ensure_litellm()
            if self.litellm is None:
                if rep == 0:
                    print(f"litellm skipped: {self.skipped}", flush=True)
                return None
        print(f"[{rep + 1}/{self.args.repeat}] {name}: llm", flush=True)
        if name == "litellm":
            target = LiteLLM(self.litellm, self.mock.url)
        elif name == "llm-example":
            target = Target(name, self.mock.url, env={**EXAMPLE_ENV, "LLM_UPSTREAM": self.mock.url})
        else:
            target = Target(name, self.mock.url)
        try:
            return workloads(target, self.scripts, self.args)
        finally:
            target.stop()

    def stop(self) -> None:
        self.mock.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--ttfc", type=int, default=200, help="sequential streamed requests timed to the first chunk")
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    args.repeat = 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    llm = LLMWorkloads(tmp, args)  # the same workloads the default run gives every target
    results = {}
    try:
        for name in args.targets.split(","):
            if (got := llm.run(name, 0)) is not None:
                results[name] = got
    finally:
        llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = {"litellm": llm.skipped} if llm.skipped else {}
    report(results, skipped)


def report(results: dict, skipped: dict) -> None:
    direct = results.get("direct", {}).get("ttfc", {}).get("p50_ms") or 0.0
    print(f"LLM workloads: one worker on CPU {PROXY_CPU}, mock upstream and load on CPU {LOAD_CPU}, 50 connections")
    print(f"{'target':10} {'buffered r/s':>12} {'r/s/core':>9} {'p50 ms':>7} {'p99 ms':>7}   "
          f"{'streamed r/s':>12} {'r/s/core':>9} {'p50 ms':>7} {'p99 ms':>7}   {'TTFC p50':>9} {'added':>7}")
    for name, r in results.items():
        cells = []
        for load in ("buffered", "streamed"):
            w = r[load]
            core = f"{w['per_core_s']:9.0f}" if w["per_core_s"] else f"{'-':>9}"
            cells.append(f"{w['rps']:12.0f} {core} {w['p50_ms']:7.2f} {w['p99_ms']:7.2f}")
        first = r["ttfc"]["p50_ms"] if r["ttfc"] else None
        ttfc = f"{first:8.3f}m {first - direct:+6.3f}m" if first is not None else f"{'-':>9} {'-':>7}"
        print(f"{name:10} {cells[0]}   {cells[1]}   {ttfc}")
    for name, why in skipped.items():
        print(f"{name:10} skipped: {why}")
    print(json.dumps({"llm": results, "skipped": skipped}))


if __name__ == "__main__":
    main()
