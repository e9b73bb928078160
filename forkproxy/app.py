"""The ready-made proxy, configured from FORKPROXY_* variables.

``gunicorn -c gunicorn.conf.py forkproxy.app`` serves ``application``. A
missing or bad variable stops the start with one line naming it, and so does
a worker that is not gevent's: gunicorn's default sync worker would serve one
request at a time and hold a worker for each stream's whole length.
"""
import sys

from forkproxy.config import ConfigError
from forkproxy.envproxy import from_env
from forkproxy.server.worker import refuse_start


def _gevent_patched() -> bool:
    """Whether gevent patched this process, as gunicorn's gevent worker does before it loads the app.

    Read from ``sys.modules`` so that a sync worker does not import gevent just to be told no.
    """
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


if not _gevent_patched():
    refuse_start("forkproxy.app needs gunicorn's gevent workers (without them one request at a time is served): "
                 "gunicorn -c gunicorn.conf.py forkproxy.app, or --worker-class gevent")
try:
    application = from_env()
except ConfigError as exc:
    refuse_start(str(exc))
