"""Server-Sent Events for hook authors: ``event_data(event)`` gives the data of one event a stream hook got.

The framing itself lives in ``forkproxy.http.sse``; this is its public face, the path the README
and the examples import from.
"""
from forkproxy.http.sse import event_data

__all__ = ["event_data"]
