"""Every PromQL the docs and `--help` show returns series from a real Prometheus scraping a real
agent (`edgefleet agent serve` in its own process, a signed model installed, screening batches
of dies); and the start-up gate check (fleet/gate_check.py) warns about a query that can never
match, such as the old documented gate on a `model_version` label the agent never exports.

Where examples are found: ```promql blocks in README.md and docs/*.md (one query per line, `#`
lines are comments), and every `--prom-gate '...'` in those files and in the help of every
command. Placeholders are filled as a rollout fills them, `{{digest}}` with the bundle digest
of the model the agent serves. Queries on the rollout controller's series (`edgefleet_rollout_*`)
are only parsed: no controller runs here yet (its exporter is fleet/controller_metrics.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer

from agent.errors import UsageError
from fleet.gate_check import check_gates_return_series, relaxed_query
from fleet.gates import parse_prom_gate
from fleet.prometheus import PrometheusClient
from tests.conftest import REPO
from tests.deploy_helpers import wait_for
from tests.prometheus_support import (  # noqa: F401 (fixtures)
    fed_prometheus_fixture,
    prometheus_procs_fixture,
)

pytestmark = pytest.mark.slow

_FENCE = re.compile(r"```promql\n(.*?)```", re.S)
_GATE = re.compile(r"--prom-gate\s+'([^']+\d)'")  # ends in its threshold
CONTROLLER_PREFIX = "edgefleet_rollout"  # edgefleet_rollouts, edgefleet_rollout_*


def help_texts() -> Iterator[tuple[str, str]]:
    """(command path, help text) for every command of the `edgefleet` tree."""
    from edgefleet.cli import app

    root = typer.main.get_command(app)

    def walk(cmd: Any, path: list[str], parent: Any):
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent, terminal_width=1000,
                                max_content_width=1000)
        cmd.rich_markup_mode = None  # the text, without rich's boxes and wrapping
        yield " ".join(path), cmd.get_help(ctx)
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, [*path, name], ctx)

    yield from walk(root, ["edgefleet"], None)


def documented_queries() -> list[tuple[str, str]]:
    """(where, query) for every PromQL example; gates without their `OP NUMBER`."""
    sources = [(str(p.relative_to(REPO)), p.read_text())
               for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]
    sources += [(f"`{path} --help`", text) for path, text in help_texts()]
    found = []
    for where, text in sources:
        for block in _FENCE.findall(text):
            found += [(where, ln.strip()) for ln in block.splitlines()
                      if ln.strip() and not ln.lstrip().startswith("#")]
        found += [(where, parse_prom_gate(g).query) for g in _GATE.findall(text)]
    return found


def fill(query: str, digest: str) -> str:
    for k, v in (("digest", digest), ("version", "1.0.0"), ("model", "robust-z"),
                 ("rollout", "r-test")):
        query = query.replace("{{" + k + "}}", v)
    return query


def test_the_docs_show_promql_examples():
    queries = documented_queries()
    assert len(queries) >= 10, queries
    assert any("{{digest}}" in q for _, q in queries)
    assert not [q for _, q in queries if "model_version" in q]  # a label no series has


def test_every_documented_query_returns_series(fed_prometheus):
    prom, digest = fed_prometheus
    queries = documented_queries()
    agent_queries = [(w, fill(q, digest)) for w, q in queries if CONTROLLER_PREFIX not in q]

    assert prom.without_series(agent_queries) == []
    bad = [(w, q, prom.parse_error(fill(q, digest))) for w, q in queries]
    assert [b for b in bad if b[2]] == []


def test_gate_check_warns_about_a_query_that_cannot_match(fed_prometheus):
    prom, _ = fed_prometheus
    client = PrometheusClient(prom.url)
    old_example = parse_prom_gate(
        'sum(rate(edgefleet_errors_total{model_version="{{version}}"}[5m])) <= 0.1')
    fixed = parse_prom_gate(
        'sum(rate(edgefleet_errors_total[5m]) and on (job, instance) '
        'edgefleet_model_info{digest="{{digest}}"}) <= 0.1')
    assert relaxed_query(fixed.query).endswith('edgefleet_model_info{digest=~".+"})')
    wait_for("two scrapes of the agent", lambda: prom.query("rate(edgefleet_errors_total[5m])"), 30)
    # Before the rollout no device runs the new bundle: the relaxed query still matches.
    warnings = check_gates_return_series(client, [old_example, fixed])
    assert len(warnings) == 1 and "model_version" in warnings[0], warnings
    assert check_gates_return_series(client, [fixed], strict=True) == []
    with pytest.raises(UsageError, match="returns no series"):
        check_gates_return_series(client, [old_example], strict=True)
