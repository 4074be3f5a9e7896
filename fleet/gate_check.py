"""Start-up check of PromQL gates: does each query return series at all?

A gate whose query can never return a series (a metric name misspelt, a label the metric does
not have, like `edgefleet_errors_total{model_version=...}`) is *inconclusive* at every
measurement, so the rollout pauses at its first bake for no visible reason. Before anything is
sent, `rollout start` runs each query once with its placeholders relaxed: a matcher on a
placeholder (`digest="{{digest}}"`) becomes "the label is set" (`digest=~".+"`), since the
new bundle runs nowhere yet. An empty answer then means the query cannot match; the operator
is warned, or with `--strict-gates` the rollout is refused.

Called by the rollout command after `PrometheusClient.check()` (fleet/cli_rollout.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.errors import UsageError
from fleet.gates import PromGate
from fleet.prometheus import PrometheusClient, PrometheusError

__all__ = ["PLACEHOLDERS", "check_gates_return_series", "relaxed_query"]

PLACEHOLDERS = ("rollout", "digest", "version", "model")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(!=|=~|!~|=)\s*"\{\{\s*(' +
                      "|".join(PLACEHOLDERS) + r')\s*\}\}"')
_BARE = re.compile(r"\{\{\s*(" + "|".join(PLACEHOLDERS) + r")\s*\}\}")


def relaxed_query(query: str) -> str:
    """`query` with every label matcher on a placeholder turned into "the label is set" and any
    other placeholder emptied: what can match before the new bundle runs anywhere."""

    def matcher(m: re.Match) -> str:
        label, op = m.group(1), m.group(2)
        return f'{label}=~".+"' if op in ("=", "=~") else f'{label}=~".*"'

    return _BARE.sub("", _MATCHER.sub(matcher, query))


def check_gates_return_series(client: PrometheusClient, gates: Iterable[PromGate], *,
                              strict: bool = False) -> list[str]:
    """One warning per gate whose relaxed query returns no series; with `strict`, raise
    `UsageError` naming them instead. A query Prometheus refuses raises `PrometheusError`."""
    empty = []
    for g in gates:
        query = relaxed_query(g.query)
        try:
            values = client.query(query)
        except PrometheusError as e:
            raise PrometheusError(f"PromQL gate {g}: {e}") from None
        if not values:
            empty.append(f"PromQL gate {g}: returns no series (ran {query!r}); it stays "
                         "inconclusive at every bake: check its metric names and labels")
    if empty and strict:
        raise UsageError("; ".join(empty), hint="fix the query, or drop --strict-gates")
    return empty
