"""forkproxy's access logger writes exactly the lines gunicorn's own Logger would."""
import datetime
import json
import logging
import types

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from forkproxy.server.accesslog import AccessLogger, Atoms, JsonAccessLogger

EVERY_ATOM = ('%(h)s %(l)s %(u)s "%(r)s" %(s)s %(m)s %(U)s %(q)s %(H)s %(b)s %(B)s "%(f)s" "%(a)s" %(T)s %(D)s '
              '%(M)s %(L)s %(p)s %({x-api-key}i)s %({X-Trace}o)s %({forkproxy.request_id}e)s %({HTTP_HOST}e)s '
              '%({absent}i)s %({absent}o)s %({absent}e)s %({forkproxy.bytes_in}e)s %(nonsense)s')


def _request(**environ):
    env = {"REQUEST_METHOD": "GET", "RAW_URI": "/v1/x?a=1", "PATH_INFO": "/v1/x", "QUERY_STRING": "a=1",
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.7", "HTTP_HOST": "gw.example",
           "HTTP_USER_AGENT": 'curl/8 "quoted"', "forkproxy.request_id": "rid-1", **environ}
    req = types.SimpleNamespace(headers=[("HOST", "gw.example"), ("X-API-KEY", "k1"), ("X-API-KEY", "k2")])
    resp = types.SimpleNamespace(status="201 Created", sent=1234, headers=[("X-Trace", "t-9"), ("Content-Length", "3")])
    return resp, req, env, datetime.timedelta(seconds=2, microseconds=345678)


def _gunicorn_line(fmt, resp, req, env, took):
    logger = Logger(Config())
    return fmt % logger.atoms_wrapper_class(logger.atoms(resp, req, env, took))


def _our_line(fmt, resp, req, env, took):
    logger = AccessLogger(Config())
    logger.cfg.set("access_log_format", fmt)
    return logger.line(Atoms(logger, resp, req, env, took))


def test_every_atom_matches_gunicorn(monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt: "[30/Nov/2026:03:00:00 +0000]")
    fmt = EVERY_ATOM + " %(t)s"
    assert _our_line(fmt, *_request()) == _gunicorn_line(fmt, *_request())


def test_the_basic_auth_user_matches_gunicorn():
    resp, req, env, took = _request(HTTP_AUTHORIZATION="Basic YWxpY2U6c2VjcmV0")  # alice:secret
    assert _our_line("%(u)s", resp, req, env, took) == _gunicorn_line("%(u)s", resp, req, env, took) == "alice"


@pytest.mark.parametrize("status", ["200 OK", 404])
def test_status_atom_matches_gunicorn_for_text_and_int_statuses(status):
    resp, req, env, took = _request()
    resp.status = status
    assert _our_line("%(s)s", resp, req, env, took) == _gunicorn_line("%(s)s", resp, req, env, took)


def test_a_response_not_sent_logs_a_dash_for_its_size():
    resp, req, env, took = _request()
    resp.sent = None
    assert _our_line("%(b)s %(B)s", resp, req, env, took) == _gunicorn_line("%(b)s %(B)s", resp, req, env, took)


def test_json_lines_carry_numbers_as_numbers_and_missing_values_as_null():
    resp, req, env, took = _request(**{"forkproxy.upstream_status": "201", "forkproxy.retries": "0"})
    logger = JsonAccessLogger(Config())
    record = json.loads(logger.line(Atoms(logger, resp, req, env, took)))
    assert record["status"] == 201 and record["bytes"] == 1234 and record["seconds"] == 2.345678
    assert record["upstream_status"] == 201 and record["retries"] == 0
    assert record["upstream_seconds"] is None and record["upstream"] is None
    assert record["user_agent"] == 'curl/8 "quoted"'  # json escapes it; no log-format escaping


def _file_logger(tmp_path, monkeypatch, fmt="%(s)s %(r)s"):
    """An access log to a file, with only gunicorn's handler on it (pytest adds its own)."""
    cfg = Config()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    cfg.set("access_log_format", fmt)
    logger = AccessLogger(cfg)
    log = logger.access_log
    monkeypatch.setattr(log, "handlers", [h for h in log.handlers if getattr(h, "_gunicorn", False)])
    monkeypatch.setattr(log, "filters", [])
    return logger, tmp_path / "access.log"


def test_lines_written_straight_to_the_access_file_match_the_logging_path(tmp_path, monkeypatch):
    logger, path = _file_logger(tmp_path, monkeypatch)
    logger.access(*_request())
    assert logger._plain_streams() is not None  # the direct write was taken
    logger.access_log.addFilter(lambda record: True)  # any filter sends lines through logging again
    logger.access(*_request())
    assert path.read_text().splitlines() == ['201 GET /v1/x?a=1 HTTP/1.1'] * 2


def test_a_filter_on_the_access_log_is_obeyed(tmp_path, monkeypatch):
    logger, path = _file_logger(tmp_path, monkeypatch)
    logger.access(*_request())
    logger.access_log.addFilter(lambda record: False)
    logger.access(*_request())
    assert path.read_text().splitlines() == ['201 GET /v1/x?a=1 HTTP/1.1']


def test_a_handler_added_at_run_time_gets_every_line(tmp_path, monkeypatch):
    logger, path = _file_logger(tmp_path, monkeypatch)
    logger.access(*_request())
    seen = []
    extra = logging.Handler()
    extra.emit = lambda record: seen.append(record.getMessage())
    logger.access_log.addHandler(extra)
    logger.access(*_request())
    assert seen == ['201 GET /v1/x?a=1 HTTP/1.1']
    assert path.read_text().splitlines() == ['201 GET /v1/x?a=1 HTTP/1.1'] * 2


def test_a_reopened_access_file_gets_the_next_lines(tmp_path, monkeypatch):
    logger, path = _file_logger(tmp_path, monkeypatch)
    logger.access(*_request())
    path.rename(tmp_path / "access.log.1")  # logrotate, then USR1
    logger.reopen_files()
    logger.access(*_request())
    assert path.read_text().splitlines() == ['201 GET /v1/x?a=1 HTTP/1.1']
    assert (tmp_path / "access.log.1").read_text().splitlines() == ['201 GET /v1/x?a=1 HTTP/1.1']
