"""What a newcomer meets first: examples that stop on missing configuration, scripts/serve, gunicorn's refusals.

Everything runs for real: gunicorn with gevent workers (or without the
config, as a newcomer might), scripts/serve as a process killed by its pid,
raw sockets for requests gunicorn refuses before the app runs.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.client import request
from tests.support.gunicorn import REPO, Gunicorn

EXAMPLES = {
    "examples.llm_gateway:app": ("LLM_UPSTREAM", ["LLM_UPSTREAM", "LLM_CLIENT_KEYS"]),
    "examples.api_gateway:app": ("API_ROUTES", ["API_ROUTES", "API_TOKENS"]),
    "examples.realtime_gateway:app": ("REALTIME_UPSTREAM", ["REALTIME_UPSTREAM", "REALTIME_CLIENT_KEYS"]),
}


def forkproxy_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("forkproxy: ")]


# -- an example without its configuration --------------------------------------------------


@pytest.mark.parametrize("app", EXAMPLES)
def test_an_example_without_its_variables_stops_the_server_after_one_line_naming_one(app):
    first, variables = EXAMPLES[app]
    g = Gunicorn(app, env={name: "" for name in variables}).start(wait=False)
    try:
        assert g.wait_exit(30) != 0, "gunicorn kept rebooting the worker"
        log = g.log()
        assert len(forkproxy_lines(log)) == 1 and f"set {first}, e.g. {first}=" in log
        assert log.count("Booting worker") == 1 and "Traceback" not in log
    finally:
        g.stop()


def test_an_example_without_its_client_keys_stops_too_instead_of_refusing_every_request():
    g = Gunicorn("examples.llm_gateway:app", env={"LLM_UPSTREAM": "http://127.0.0.1:9", "LLM_CLIENT_KEYS": ""})
    g.start(wait=False)
    try:
        assert g.wait_exit(30) != 0
        assert forkproxy_lines(g.log()) == [
            "forkproxy: examples.llm_gateway: set LLM_CLIENT_KEYS, e.g. LLM_CLIENT_KEYS=team-a-key,team-b-key"]
    finally:
        g.stop()


# -- forkproxy.app without gunicorn.conf.py -----------------------------------------------------


def run_without_config(cwd, *args: str) -> subprocess.Popen:
    """``gunicorn forkproxy.app`` without ``-c gunicorn.conf.py``, on a pre-bound loopback socket.

    Run outside the repo, as after ``pip install``: in its root gunicorn reads ./gunicorn.conf.py by itself.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FORKPROXY_UPSTREAM": "http://127.0.0.1:9"}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"fd://{listener.fileno()}",
                             "--no-control-socket", *args, "forkproxy.app"], cwd=cwd, env=env,
                            pass_fds=[listener.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.port = listener.getsockname()[1]
    listener.close()
    return proc


def test_forkproxy_app_on_gunicorns_default_sync_worker_refuses_to_start_with_one_line(tmp_path):
    proc = run_without_config(tmp_path)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert forkproxy_lines(out) == [
        "forkproxy: forkproxy.app needs gunicorn's gevent workers (without them one request at a time is served): "
        "gunicorn -c gunicorn.conf.py forkproxy.app, or --worker-class gevent"]


def test_forkproxy_app_on_the_gevent_worker_class_serves_without_the_config(tmp_path):
    proc = run_without_config(tmp_path, "--worker-class", "gevent")
    try:
        deadline, reply = time.monotonic() + 20, None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = request(f"http://127.0.0.1:{proc.port}", "GET", "/x")
            except OSError:
                time.sleep(0.1)
        assert reply is not None and reply.status == 502 and reply.error_type() == "upstream_unreachable"  # served: the upstream is :9
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


# -- requests gunicorn refuses before the app runs ----------------------------------------------


@pytest.fixture(scope="module")
def small_limits():
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": "http://127.0.0.1:9"},
                 args=("--limit-request-fields", "20", "--limit-request-field_size", "1024",
                       "--limit-request-line", "2048")).start()
    yield g
    g.stop()


def raw_reply(port: int, data: bytes) -> tuple[bytes, dict, bytes]:
    """Status line, headers (lower-cased names) and body of the one reply to ``data``; gunicorn then closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *fields = head.split(b"\r\n")
    return status, {k.strip().lower(): v.strip() for k, _, v in (f.partition(b":") for f in fields)}, body


HEAD = b"Host: x\r\n"


@pytest.mark.parametrize("data, status, error_type", [
    (b"GET * HTTP/1.1\r\n" + HEAD + b"\r\n", 400, "bad_request"),
    (b"GET @evil HTTP/1.1\r\n" + HEAD + b"\r\n", 400, "bad_request"),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"POST /x HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, "bad_request"),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n", 414, "bad_request"),
    (b"GET / HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 2000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET / HTTP/1.1\r\n" + HEAD + b"".join(b"X-%d: a\r\n" % i for i in range(25)) + b"\r\n",
     431, "headers_too_large"),
], ids=["asterisk", "at-host", "garbage-line", "cl-and-te", "line-over-limit", "field-over-size", "too-many-fields"])
def test_a_request_gunicorn_refuses_gets_the_contracts_json_error_and_its_log_line(small_limits, data, status,
                                                                                   error_type):
    status_line, headers, body = raw_reply(small_limits.port, data)
    assert status_line.startswith(b"HTTP/1.1 %d " % status)
    assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == error_type and error["message"]
    small_limits.wait_for_log(r"Invalid request from ip=127\.0\.0\.1: ")


# -- scripts/serve ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for p in out for child in (p, *descendants(int(p)))]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def gone(pids: list[int], within: float) -> bool:
    """Whether every process in ``pids`` ended (the demo upstream is told to end as the script exits)."""
    deadline = time.monotonic() + within
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_scripts_serve_runs_an_example_against_the_demo_and_its_pid_takes_everything_down_on_sigterm():
    port, demo_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "FORKPROXY_"))}
    env.update(FORKPROXY_BIND=f"127.0.0.1:{port}", FORKPROXY_DEMO_PORT=str(demo_port))
    serve = subprocess.Popen([str(REPO / "scripts" / "serve"), "examples.llm_gateway:app", "--workers", "1",
                              "--no-control-socket"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120  # a first run may set up the venv
        reply = None
        while reply is None and time.monotonic() < deadline and serve.poll() is None:
            try:
                reply = request(f"http://127.0.0.1:{port}", "POST", "/v1/chat/completions",
                                body=b'{"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}',
                                headers={"Authorization": "Bearer demo-key"})
            except OSError:
                time.sleep(0.2)
        assert reply is not None and reply.status == 200, serve.poll()
        assert reply.json()["choices"][0]["message"]["content"] == "You said: hi"
        started = descendants(serve.pid)
        assert len(started) >= 3  # the demo upstream, gunicorn's master and its worker
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=40)
        assert "LLM_CLIENT_KEYS=demo-key" in out and "Handling signal: term" in out
        assert not listening(port) and not listening(demo_port)
        assert gone(started, within=5)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
