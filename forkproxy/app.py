"""The ready-made proxy, configured from FORKPROXY_* variables.

``gunicorn -c gunicorn.conf.py forkproxy.app`` serves ``application``. A
missing or bad variable stops the worker with one line naming it.
"""
import sys

from forkproxy.config import ConfigError
from forkproxy.envproxy import from_env

try:
    application = from_env()
except ConfigError as exc:
    sys.stderr.write(f"forkproxy: {exc}\n")
    sys.stderr.flush()
    raise SystemExit(3) from None  # gunicorn: worker boot error, the master stops
