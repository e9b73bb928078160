"""gunicorn.conf.py: plain config the master loads without gevent, urllib3 or the proxy, and the start it checks."""
import json
import pydoc
import subprocess
import sys

import gunicorn
import pytest
import urllib3

from forkproxy.server import capabilities
from tests.support.gunicorn import CONF, REPO, Gunicorn


def load_config(env: dict) -> subprocess.CompletedProcess:
    """Load gunicorn.conf.py as gunicorn's master would, in a fresh interpreter; print what it set."""
    code = (
        "import json, sys, runpy\n"
        f"cfg = runpy.run_path({str(CONF)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('forkproxy', 'gevent', 'urllib3')"
        " and m not in ('forkproxy', 'forkproxy.config', 'forkproxy.server', 'forkproxy.server.accesslog'))\n"
        "print(json.dumps({'bad': bad, **{k: cfg[k] for k in ('worker_class', 'workers', 'worker_connections',"
        " 'bind', 'graceful_timeout', 'accesslog', 'loglevel', 'METRICS_BIND')},"
        " 'logger_class': cfg['logger_class'].__name__}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env})


def test_loading_the_config_imports_no_gevent_urllib3_or_proxy():
    out = json.loads(load_config({}).stdout)
    assert out["bad"] == []
    assert out["worker_class"] == "gevent"
    assert out["workers"] >= 1 and out["worker_connections"] >= 1000


def test_the_configs_variables_are_read_through_their_records():
    out = json.loads(load_config({
        "FORKPROXY_BIND": "127.0.0.1:9999", "FORKPROXY_WORKER_CONNECTIONS": "2000", "FORKPROXY_GRACEFUL_TIMEOUT": "5",
        "FORKPROXY_ACCESS_LOG": "/dev/null", "FORKPROXY_LOG_LEVEL": "warning", "FORKPROXY_ACCESS_LOG_FORMAT": "JSON",
    }).stdout)
    assert (out["bind"], out["worker_connections"], out["graceful_timeout"]) == ("127.0.0.1:9999", 2000, 5)
    assert (out["accesslog"], out["loglevel"], out["logger_class"]) == ("/dev/null", "warning", "JsonAccessLogger")
    defaults = json.loads(load_config({}).stdout)
    assert (defaults["bind"], defaults["graceful_timeout"], defaults["accesslog"], defaults["METRICS_BIND"]) == (
        "127.0.0.1:8080", 30, "-", "")


def test_a_bad_config_variable_stops_the_start_with_one_line():
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": "http://127.0.0.1:9",
                                       "FORKPROXY_GRACEFUL_TIMEOUT": "soon"}).start(wait=False)
    try:
        assert g.wait_exit(20) != 0
        assert g.log().strip() == "forkproxy: FORKPROXY_GRACEFUL_TIMEOUT: not a number: 'soon'"
    finally:
        g.stop()


# -- the check of urllib3's and gunicorn's internals -------------------------------------------------

APP_WITHOUT = """
import {module}
del {module}.{name}  # as a release without it would be
from forkproxy import Proxy
app = Proxy("http://127.0.0.1:9")
"""


@pytest.mark.parametrize("module, name, package", [
    ("urllib3.connectionpool", "HTTPConnectionPool._put_conn", urllib3),
    ("gunicorn.glogging", "Logger._get_user", gunicorn),
    ("gunicorn.http.unreader", "Unreader.take_buffered", gunicorn),  # a tunnel's: server.takeover's check
])
def test_a_worker_on_a_release_without_an_internal_stops_the_start_with_one_line_naming_it(
        tmp_path, module, name, package):
    (tmp_path / "app_without.py").write_text(APP_WITHOUT.format(module=module, name=name))
    g = Gunicorn("app_without:app", env={"PYTHONPATH": f"{tmp_path}:{REPO}"}).start(wait=False)
    try:
        assert g.wait_exit(20) == 3  # gunicorn's boot error: the master stops
        ours = [line for line in g.log().splitlines() if line.startswith("forkproxy:")]
        assert len(ours) == 1, g.log()
        assert f"{package.__name__} {package.__version__}" in ours[0]
        if package is not gunicorn or "take_buffered" not in name:
            assert f"{name} is missing" in ours[0]
        assert "Traceback" not in g.log()
    finally:
        g.stop()


def test_the_installed_urllib3_and_gunicorn_have_what_forkproxy_relies_on():
    capabilities.check()


def _without_access_log(self, cfg):
    self.cfg = cfg


def _keeps_running(self, sig, frame):
    pass


def _urlopen_catching_everything(self, method, url, **kw):
    try:
        return None
    except Exception:
        raise


@pytest.mark.parametrize("owner, name, replacement, said", [
    ("urllib3.connectionpool.HTTPConnectionPool", "_make_request",
     lambda self, conn, method, url, body=None, retries=None, timeout=None: None,
     "urllib3 {urllib3}: HTTPConnectionPool._make_request no longer takes headers"),
    ("urllib3.connectionpool.HTTPConnectionPool", "_get_conn", None,
     "urllib3 {urllib3}: HTTPConnectionPool._get_conn is missing"),
    ("urllib3.connectionpool.HTTPConnectionPool", "urlopen", _urlopen_catching_everything,
     "urllib3 {urllib3}: HTTPConnectionPool.urlopen catches AttemptFailed in its except Exception"),
    ("urllib3.util.retry.Retry", "get_retry_after", None, "urllib3 {urllib3}: Retry.get_retry_after is missing"),
    ("gunicorn.glogging.Logger", "__init__", _without_access_log,
     "gunicorn {gunicorn}: Logger.__init__ no longer sets access_log"),
    ("gunicorn.workers.base.Worker", "handle_exit", _keeps_running,
     "gunicorn {gunicorn}: Worker.handle_exit no longer sets alive"),
    ("forkproxy.http.headers", "store_is_grouped_by_lower_name", lambda: False,
     "urllib3 {urllib3}: HTTPHeaderDict keeps no _container"),
])
def test_each_internal_that_changed_is_named_with_its_package_and_version(monkeypatch, owner, name, replacement,
                                                                          said):
    target = pydoc.locate(owner)
    if replacement is None:
        monkeypatch.delattr(target, name)
    else:
        monkeypatch.setattr(target, name, replacement)
    with pytest.raises(capabilities.Unsupported) as info:
        capabilities.check()
    assert said.format(urllib3=urllib3.__version__, gunicorn=gunicorn.__version__) in str(info.value)


def test_every_internal_that_changed_is_on_the_one_line(monkeypatch):
    from urllib3.connectionpool import HTTPConnectionPool

    from gunicorn.glogging import Logger

    monkeypatch.delattr(HTTPConnectionPool, "_put_conn")
    monkeypatch.delattr(Logger, "_get_user")
    with pytest.raises(capabilities.Unsupported) as info:
        capabilities.check()
    message = str(info.value)
    assert "\n" not in message and "_put_conn is missing" in message and "_get_user is missing" in message
