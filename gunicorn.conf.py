"""gunicorn settings for forkproxy: `gunicorn -c gunicorn.conf.py forkproxy.app`.

Plain gunicorn config; anything here can still be overridden by flags or
GUNICORN_CMD_ARGS. Nothing at module level imports forkproxy, gevent or
urllib3: this file runs in the master, and each gevent worker must patch the
standard library before those are imported.
"""
import multiprocessing
import os

bind = os.environ.get("FORKPROXY_BIND", "127.0.0.1:8080")

# One process per core; each runs one greenlet per request, so the CPU, not
# the number of open requests, bounds a worker.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
worker_class = "gevent"
# Simultaneous client connections per worker. Streams hold theirs for their
# whole length, so this is far above gunicorn's default of 1000.
worker_connections = int(os.environ.get("FORKPROXY_WORKER_CONNECTIONS", 10000))

# Idle seconds a client keep-alive connection is kept (nginx in front reuses them).
keepalive = 75
# SIGTERM/SIGHUP: in-flight requests and streams get this long to finish.
graceful_timeout = 30
# Liveness of the worker's heartbeat, not of a request: a gevent worker
# keeps beating while streams of any length are open.
timeout = 30

# Access log with what the proxy adds: upstream status, upstream seconds, retries.
accesslog = "-"
access_log_format = (
    '%(h)s "%(r)s" %(s)s %(B)s %(L)ss '
    'upstream=%({forkproxy.upstream_status}e)s '
    'upstream_time=%({forkproxy.upstream_time}e)ss '
    'retries=%({forkproxy.retries}e)s'
)
errorlog = "-"
loglevel = os.environ.get("FORKPROXY_LOG_LEVEL", "info")


def post_worker_init(worker):
    """In the worker, after gevent patched it: hand gunicorn's settings to forkproxy."""
    from forkproxy.serving import configure_worker

    configure_worker(worker)
