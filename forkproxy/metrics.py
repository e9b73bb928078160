"""Prometheus metrics, correct across gunicorn workers (prometheus_client multiprocess mode).

Off unless PROMETHEUS_MULTIPROC_DIR is set, which gunicorn.conf.py does when
FORKPROXY_METRICS_BIND asks for a metrics listener; then each worker writes
its samples to that directory and the master serves their sum. Off, every
call here is one attribute check.
"""
from __future__ import annotations

import os

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The proxy's counters; ``enabled`` is False when nothing collects them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram  # imported only in workers that use it

        self.requests = Counter("forkproxy_requests_total", "Requests answered, by method, status and upstream",
                                ["method", "status", "upstream"])
        self.upstream_latency = Histogram("forkproxy_upstream_latency_seconds",
                                          "Seconds until the upstream's response head (retries included)",
                                          ["upstream"], buckets=_BUCKETS)
        self.retries = Counter("forkproxy_upstream_retries_total", "Retries made", ["upstream"])
        self.errors = Counter("forkproxy_proxy_errors_total", "Errors answered by the proxy itself", ["type"])
        self.active_streams = Gauge("forkproxy_active_streams", "Streams being relayed now",
                                    multiprocess_mode="livesum")
        self.stream_units = Counter("forkproxy_stream_units_total", "Stream units relayed")
        self.stream_bytes = Counter("forkproxy_stream_bytes_total", "Stream bytes read from upstreams")
        self.active_tunnels = Gauge("forkproxy_active_tunnels", "Tunnels (WebSocket) open now",
                                    multiprocess_mode="livesum")
        self.tunnel_bytes = Counter("forkproxy_tunnel_bytes_total", "Bytes carried by tunnels, by the side that sent them",
                                    ["source"])
        self.rate_limited = Counter("forkproxy_rate_limited_total", "Requests refused by a rate limit, by its name "
                                    "(the key's prefix up to ':')", ["limit"])
        self.limits_store_errors = Counter("forkproxy_limits_store_errors_total",
                                           "Calls to the limits store that failed (down, slow, refused, full)")
        self.limits_charges_dropped = Counter("forkproxy_limits_charges_dropped_total",
                                              "Charges by key that found no limit of that key in the store, by "
                                              "the key's prefix up to ':'", ["limit"])
        # Health is kept per worker: a member is up here only while every worker sees it up.
        self.upstream_up = Gauge("forkproxy_upstream_up", "1 while the pool member is live (in every worker)",
                                 ["upstream"], multiprocess_mode="min")
        self.marked_down = Counter("forkproxy_upstream_marked_down_total", "Times a pool member was marked down",
                                   ["upstream"])
        self.traces_dropped = Counter("forkproxy_traces_dropped_total", "Spans not exported, by reason: "
                                      "queue_full, export_failed, shutdown", ["reason"])

    @classmethod
    def from_env(cls) -> "Metrics":
        return cls(bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")))

    def answered(self, method: str, status: int, upstream: str, error_type: str | None) -> None:
        self.requests.labels(method if method in _METHODS else "other", str(status), upstream).inc()
        if error_type is not None:
            self.errors.labels(error_type).inc()

    def upstream_done(self, upstream: str, seconds: float, retries: int) -> None:
        self.upstream_latency.labels(upstream).observe(seconds)
        if retries:
            self.retries.labels(upstream).inc(retries)

    def member_state(self, upstream: str, live: bool, counted: bool = True) -> None:
        self.upstream_up.labels(upstream).set(1 if live else 0)
        if not live and counted:
            self.marked_down.labels(upstream).inc()

    def stream_ended(self, units: int, nbytes: int) -> None:
        self.stream_units.inc(units)
        self.stream_bytes.inc(nbytes)

    def tunnel_ended(self, from_client: int, from_upstream: int) -> None:
        self.tunnel_bytes.labels("client").inc(from_client)
        self.tunnel_bytes.labels("upstream").inc(from_upstream)


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """The process's Metrics, made on first use (in the worker, after the fork)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics.from_env()
    return _metrics
