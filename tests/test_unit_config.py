"""The settings' records, and what is derived from them: defaults, checks, the environment.

The README's tables are held to the records by tests/test_unit_docs.py.
"""
import re

import pytest

from forkproxy import Proxy
from forkproxy.config import APP, DEFAULTS, PROXY, SERVER, SETTINGS, ConfigError, env_settings, env_table
from tests.test_unit_docs import doc_table as readme_table  # noqa: F401  (tests/test_unit_hooks.py reads it here)


def test_every_variable_belongs_to_one_setting_and_names_it():
    variables = [s.env for s in SETTINGS if s.env]
    assert len(variables) == len(set(variables))
    for setting in SETTINGS:
        if setting.env:
            assert setting.env == "FORKPROXY_" + setting.name.upper(), setting


def test_a_proxys_keywords_are_the_proxy_records_and_their_defaults_are_its_attributes():
    proxy = Proxy("http://127.0.0.1:1")
    assert set(DEFAULTS) | {"upstream"} == {s.name for s in SETTINGS if s.part == PROXY}
    for name, default in DEFAULTS.items():
        assert getattr(proxy, name) == default, name


def test_an_unset_or_empty_variable_leaves_its_default_and_a_required_one_must_be_there():
    assert env_settings({"FORKPROXY_UPSTREAM": "http://127.0.0.1:1", "FORKPROXY_TIMEOUT": ""}, PROXY) == {
        "upstream": "http://127.0.0.1:1"}
    assert env_settings({}, APP) == env_settings({}, SERVER) == {}
    with pytest.raises(ConfigError, match="FORKPROXY_UPSTREAM is not set"):
        env_settings({}, PROXY)


@pytest.mark.parametrize("variable, value, words", [
    ("FORKPROXY_WORKER_CONNECTIONS", "many", ["not a number", "'many'"]),
    ("FORKPROXY_WORKER_CONNECTIONS", "0", ["at least 1"]),
    ("FORKPROXY_GRACEFUL_TIMEOUT", "-1", ["at least 0", "'-1'"]),
    ("FORKPROXY_GRACEFUL_TIMEOUT", "2.5", ["not a number"]),
])
def test_a_bad_server_variable_is_one_line_naming_it(variable, value, words):
    with pytest.raises(ConfigError) as info:
        env_settings({variable: value}, SERVER)
    assert str(info.value).startswith(variable + ":") and "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_the_table_shows_each_default_as_a_reader_would_type_it():
    shown = dict(re.findall(r"^\| `(FORKPROXY_\w+)` \| .* \| (.*) \|$", env_table(), re.M))
    assert (shown["FORKPROXY_TIMEOUT"], shown["FORKPROXY_POOL_IDLE_TIMEOUT"], shown["FORKPROXY_UPSTREAM"]) == (
        "30", "4", "required")
    assert (shown["FORKPROXY_MAX_REQUEST_BODY_BYTES"], shown["FORKPROXY_METRICS_BIND"]) == ("1048576", "off")
