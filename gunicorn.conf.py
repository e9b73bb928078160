"""gunicorn settings for forkproxy: `gunicorn -c gunicorn.conf.py forkproxy.app`.

Plain gunicorn config; anything here can still be overridden by flags or
GUNICORN_CMD_ARGS. This file runs in the master, and each gevent worker must
patch the standard library before gevent, urllib3 or the proxy is imported:
of forkproxy only the settings' records and the access logger are loaded
here, and they import neither.
"""
import multiprocessing
import os
import shutil
import sys
import tempfile

from forkproxy.config import SERVER, ConfigError, defaults, env_settings
from forkproxy.server.accesslog import AccessLogger, JsonAccessLogger

# The FORKPROXY_* variables of this file: their defaults and checks are forkproxy.config's records.
try:
    _given = {**defaults(SERVER), **env_settings(os.environ, SERVER)}
except ConfigError as exc:
    sys.exit(f"forkproxy: {exc}")  # one line; gunicorn stops before it starts anything

bind = _given["bind"]

# One process per core; each runs one greenlet per request, so the CPU, not
# the number of open requests, bounds a worker.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
worker_class = "gevent"
# Simultaneous client connections per worker. Streams hold theirs for their
# whole length, so this is far above gunicorn's default of 1000.
worker_connections = _given["worker_connections"]
backlog = 4096

# Idle seconds a client keep-alive connection is kept (nginx in front reuses them).
keepalive = 75
# SIGTERM/SIGHUP: in-flight requests and streams get this long to finish.
graceful_timeout = _given["graceful_timeout"]
# Liveness of the worker's heartbeat, not of a request: a gevent worker
# keeps beating while streams of any length are open.
timeout = 30

# Peers whose X-Forwarded-Proto/-Host are believed (gunicorn's default:
# FORWARDED_ALLOW_IPS or 127.0.0.1,::1). forkproxy follows the same setting.
# Behind nginx on another host, set it to that host's address.

# Access log with what the proxy adds: request ID, upstream status, the upstream (pool member) that
# answered or was tried last as host:port, upstream seconds (a bare number, so that a reply no upstream
# answered shows `-`, not `-s`), retries; a tunnel's line (status 101, written when it ends) has the
# bytes from the upstream as %(B)s and those from the client as bytes_in.
accesslog = _given["access_log"]
access_log_format = (
    '%(h)s "%(r)s" %(s)s %(B)s %(L)ss '
    'id=%({forkproxy.request_id}e)s '
    'upstream=%({forkproxy.upstream_status}e)s '
    'upstream_time=%({forkproxy.upstream_time}e)s '
    'retries=%({forkproxy.retries}e)s '
    'upstream_addr=%({forkproxy.upstream}e)s '
    'bytes_in=%({forkproxy.bytes_in}e)s'
)
errorlog = "-"
loglevel = _given["log_level"]


# gunicorn's lines, built from only the atoms the format names; or one JSON object per line.
logger_class = AccessLogger
if _given["access_log_format"].lower() == "json":
    logger_class = JsonAccessLogger


# Prometheus metrics, summed over all workers, on their own address (off unless set).
METRICS_BIND = _given["metrics_bind"]
if METRICS_BIND and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Workers inherit this and write their samples here; the master serves the sum.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="forkproxy-metrics-")


def when_ready(server):
    if not METRICS_BIND:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    host, _, port = METRICS_BIND.rpartition(":")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    server.log.info("Metrics at http://%s/metrics", METRICS_BIND)


def child_exit(server, worker):
    """A dead worker's live gauges must not count any more."""
    if METRICS_BIND:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if METRICS_BIND and os.path.basename(directory).startswith("forkproxy-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


def post_worker_init(worker):
    """In the worker, after gevent patched it: check urllib3 and gunicorn, hand gunicorn's settings to forkproxy."""
    from forkproxy.server.worker import configure_worker

    configure_worker(worker)


def worker_exit(server, worker):
    """Flush this worker's spans before it goes, within what is left of graceful_timeout.

    The master calls this too, for a worker already gone: nothing to flush
    there, and the master must not import gevent.
    """
    if os.getpid() != worker.pid:
        return
    from forkproxy.server.shutdown import time_left
    from forkproxy.tracing import shutdown_worker

    shutdown_worker(time_left(float(worker.cfg.graceful_timeout)))
