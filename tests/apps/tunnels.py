"""Tunnel gateways for the end-to-end tests.

``app`` copies bytes (no message hook); ``messages_app`` overrides
on_ws_message, its behaviour picked by the request's X-Mode header:
``pass`` (default), ``upper`` (text upper-cased), ``drop`` (messages holding
"drop-me" vanish), ``fail`` (the hook raises on "boom"), ``count-usage``
(upstream usage events summed into stats.meta), ``slow-client`` (the hook
blocks 20 ms on each client message, as one doing I/O would). Both swap the
client's key for the real one, refuse X-Test-Deny with 401, and append one
JSON line per tunnel to $TEST_RECORDS from on_tunnel_end.
"""
import json
import os

import gevent

from forkproxy import Proxy

SETTINGS = {}
for key, env, kind in (("tunnel_idle_timeout", "TEST_TUNNEL_IDLE", float),
                       ("max_ws_message_bytes", "TEST_MAX_MESSAGE", int), ("ca_certs", "TEST_CA", str)):
    if os.environ.get(env):
        SETTINGS[key] = kind(os.environ[env])


class TunnelGateway(Proxy):
    def pick_upstream(self, req):
        return req.headers.get("X-Test-Upstream") or self.upstream

    def before_forward(self, req, res, ureq):
        if "X-Test-Deny" in req.headers:
            res.status, res.body = 401, b'{"error": "denied"}'
            return True
        if req.headers.get("Authorization") == "Bearer client-key":
            ureq.headers["Authorization"] = "Bearer real-key"
        return False

    def on_tunnel_end(self, req, stats):
        record = {"path": req.path, "closed_by": stats.closed_by, "errored": stats.errored,
                  "bytes_from_client": stats.bytes_from_client, "bytes_from_upstream": stats.bytes_from_upstream,
                  "messages_from_client": stats.messages_from_client,
                  "messages_from_upstream": stats.messages_from_upstream, "meta": stats.meta}
        with open(os.environ["TEST_RECORDS"], "a") as f:
            f.write(json.dumps(record) + "\n")


class MessageGateway(TunnelGateway):
    def on_ws_message(self, msg, out, stats):
        mode = stats.req.headers.get("X-Mode", "pass")
        data = msg.data
        if mode == "slow-client" and msg.from_client:
            gevent.sleep(0.02)
        if mode == "upper" and isinstance(data, str):
            out.send(data.upper())
        elif mode == "drop" and "drop-me" in (data if isinstance(data, str) else data.decode("latin-1")):
            return
        elif mode == "fail" and data == "boom":
            raise RuntimeError("hook failed on purpose")
        elif mode == "count-usage" and not msg.from_client:
            event = json.loads(data)
            usage = event.get("response", {}).get("usage")
            if usage:
                stats.meta["tokens"] = stats.meta.get("tokens", 0) + usage["total_tokens"]
            out.send(data)
        else:
            out.send(data)


def with_census(proxy):
    """``proxy``, plus GET /_census: the worker's live greenlets and open file descriptors, as JSON.

    Greenlets are gevent's spawned ones (requests, tunnel directions): the hub's
    and its DNS thread pool's come and go on their own (an idle pool thread
    exits after gevent's threadpool_idle_task_timeout).
    """
    def app(environ, start_response):
        if environ["PATH_INFO"] != "/_census":
            return proxy(environ, start_response)
        import gc

        gc.collect()
        live = sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)
        body = json.dumps({"greenlets": live, "fds": len(os.listdir("/proc/self/fd"))}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app


app = with_census(TunnelGateway(os.environ["TEST_UPSTREAM"], **SETTINGS))
messages_app = with_census(MessageGateway(os.environ["TEST_UPSTREAM"], **SETTINGS))
