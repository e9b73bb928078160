"""The ready-made proxy, configured from FORKPROXY_* variables.

``gunicorn -c gunicorn.conf.py forkproxy.app`` serves ``application``. A
missing or bad variable stops the start with one line naming it.
"""
from forkproxy.config import ConfigError
from forkproxy.envproxy import from_env
from forkproxy.server.worker import refuse_start

try:
    application = from_env()
except ConfigError as exc:
    refuse_start(str(exc))
