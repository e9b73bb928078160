"""gunicorn.conf.py is plain config that the master can load without gevent, urllib3 or the proxy."""
import json
import subprocess
import sys

from tests.support.gunicorn import CONF


def test_loading_the_config_imports_no_gevent_urllib3_or_proxy():
    code = (
        "import json, sys, runpy\n"
        f"cfg = runpy.run_path({str(CONF)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('forkproxy', 'gevent', 'urllib3')"
        " and m not in ('forkproxy', 'forkproxy.server', 'forkproxy.server.accesslog'))\n"
        "print(json.dumps({'bad': bad, 'worker_class': cfg['worker_class'], 'workers': cfg['workers'],"
        " 'worker_connections': cfg['worker_connections']}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["bad"] == []
    assert out["worker_class"] == "gevent"
    assert out["workers"] >= 1 and out["worker_connections"] >= 1000
