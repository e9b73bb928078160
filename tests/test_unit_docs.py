"""The reference tables of README.md and docs/ hold exactly what the code has.

Settings, FORKPROXY_* variables, metrics and error types: each one in the
code is in the docs, and each one in the docs is in the code. The hooks'
table is held to ``forkproxy.hooks.HOOKS`` by tests/test_unit_hooks.py
(through ``doc_table`` here, re-exported by tests/test_unit_config.py).
"""
import re
from pathlib import Path

from forkproxy import errors
from forkproxy.config import PROXY, SETTINGS, env_table
from forkproxy.server.worker import _REFUSAL_TYPES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The reference: the README and docs/, but not the benchmarks' history, which quotes old runs.
DOCS = [README, *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "benchmarks.md")]
# Where the code reads FORKPROXY_* variables: the package, the gunicorn config and the scripts a user runs.
CODE = [*sorted((REPO / "forkproxy").rglob("*.py")), REPO / "gunicorn.conf.py",
        *(REPO / "scripts" / name for name in ("serve", "_venv.sh", "test", "test-newest"))]


def doc_table(heading: str) -> str:
    """The first Markdown table under the line ``heading`` in the README or, failing that, a page of docs/."""
    for page in DOCS:
        text = page.read_text()
        if f"\n{heading}\n" in text:
            section = text.split(f"\n{heading}\n", 1)[1]
            return "|" + section.split("\n|", 1)[1].split("\n\n", 1)[0]
    raise AssertionError(f"no heading {heading!r} in README.md or docs/")


def column(heading: str, index: int) -> set[str]:
    """The names in backticks in column ``index`` (0-based) of the table under ``heading``."""
    rows = doc_table(heading).splitlines()[2:]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[index + 1])}


def variables_in(paths: list[Path]) -> set[str]:
    """FORKPROXY_* names; a wildcard such as FORKPROXY_RETRY_* is not one."""
    found = {m for p in paths if p.exists() for m in re.findall(r"FORKPROXY_[A-Z0-9_]+", p.read_text())}
    return {name for name in found if not name.endswith("_")}


def test_the_table_of_variables_is_the_one_the_records_make():
    assert doc_table("## Settings") == env_table(), "paste forkproxy.config.env_table() under README's ## Settings"


def test_every_forkproxy_variable_the_code_reads_is_documented_and_every_documented_one_is_read():
    in_code, in_docs = variables_in(CODE), variables_in(DOCS)
    assert {s.env for s in SETTINGS if s.env} <= in_code
    assert in_code - in_docs == set(), "read by the code, missing from README.md and docs/"
    assert in_docs - in_code == set(), "in README.md or docs/, read by no code"


def test_every_setting_of_a_proxy_is_in_the_settings_reference_and_nothing_else_is():
    assert column("## Settings of a Proxy", 0) == {s.name for s in SETTINGS if s.part == PROXY}


def test_every_metric_is_in_the_metrics_table_and_nothing_else_is():
    source = (REPO / "forkproxy" / "metrics.py").read_text()
    assert column("## Metrics", 0) == set(re.findall(r'"(forkproxy_\w+)"', source))


def error_types_in_code() -> set[str]:
    """Every error type a client can get: the proxy's errors, gunicorn's refusals, the SSE error event."""
    def subclasses(cls):
        return {cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))}
    raised = {cls.type for cls in subclasses(errors.ProxyError) if cls is not errors.ProxyError}
    events = {m for p in (REPO / "forkproxy" / "relay").glob("*.py")
              for m in re.findall(r'"type": "(\w+)"', p.read_text())}
    return raised | set(_REFUSAL_TYPES.values()) | {"bad_request"} | events


def test_every_error_type_is_in_the_errors_table_and_nothing_else_is():
    assert column("## Errors", 1) == error_types_in_code()
