"""A minimal Prometheus HTTP API client for rollout gates: one instant query, its numbers.

    client = PrometheusClient("http://prometheus:9090", timeout_s=5)
    client.query('sum(rate(edgefleet_errors_total[1m]))')   # -> [0.02]  (one per series)
    client.series('sum by (digest) (edgefleet_model_info)') # -> [({"digest": ...}, 3.0)]
    client.check()                                          # raises if it does not answer

Every failure is a `PrometheusError` whose message names the URL (or the query) and what went
wrong: connection refused, timeout, an HTTP status, a response that is not the API's JSON, or
the API's own error (`bad_data: parse error ...`). A gate that gets one counts as failed.
Responses are read up to `MAX_RESPONSE` bytes.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from agent.errors import EdgefleetError

MAX_RESPONSE = 4 * 1024 * 1024

__all__ = ["PrometheusClient", "PrometheusError"]


class PrometheusError(EdgefleetError):
    """Prometheus did not answer, or answered with an error."""


@dataclass(frozen=True)
class PrometheusClient:
    url: str  # base URL, e.g. http://prometheus:9090
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise PrometheusError(f"Prometheus URL {self.url!r}: expected http(s)://host:port")

    def _get(self, path: str, params: dict[str, str]) -> dict:
        url = self.url.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as e:
            body = e.read(MAX_RESPONSE + 1)
            detail = _api_error(body) or f"HTTP {e.code} {e.reason}"
            raise PrometheusError(f"Prometheus at {self.url}: {detail}") from None
        except urllib.error.URLError as e:
            raise PrometheusError(f"Prometheus at {self.url} does not answer: {e.reason}",
                                  hint="check --prometheus") from None
        except TimeoutError:
            raise PrometheusError(f"Prometheus at {self.url} does not answer within "
                                  f"{self.timeout_s:g} s", hint="check --prometheus") from None
        except OSError as e:
            raise PrometheusError(f"Prometheus at {self.url} does not answer: {e}",
                                  hint="check --prometheus") from None
        if len(body) > MAX_RESPONSE:
            raise PrometheusError(f"Prometheus at {self.url}: response larger than "
                                  f"{MAX_RESPONSE} bytes")
        try:
            doc = json.loads(body)
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url}: the answer is not JSON "
                                  "(is this a Prometheus server?)") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            detail = _api_error(body) or "status is not 'success'"
            raise PrometheusError(f"Prometheus at {self.url}: {detail}")
        return doc

    def check(self) -> None:
        """Raise `PrometheusError` unless the server answers a trivial query."""
        self.query("vector(1)")

    def query(self, promql: str) -> list[float]:
        """Run an instant query; one number per series (a scalar gives one number). NaN is
        kept (the caller decides). Raises `PrometheusError`."""
        return [v for _, v in self.series(promql)]

    def series(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Run an instant query; (labels, number) per series, for a caller that tells the
        series apart (label gates: by predicted and actual). A scalar has no labels."""
        doc = self._get("/api/v1/query", {"query": promql})
        data = doc.get("data") or {}
        kind, result = data.get("resultType"), data.get("result")
        try:
            if kind == "scalar":
                return [({}, float(result[1]))]
            if kind == "vector":
                return [(dict(r.get("metric") or {}), float(r["value"][1])) for r in result]
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            pass
        raise PrometheusError(f"Prometheus at {self.url}: query {promql!r}: expected a scalar "
                              f"or an instant vector, found {kind!r}")


def _api_error(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("error"):
        return f"{doc.get('errorType', 'error')}: {doc['error']}"
    return None


def finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]
