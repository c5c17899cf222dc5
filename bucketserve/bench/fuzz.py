"""Property-based fuzzing of a server's generation endpoints from its own OpenAPI document.

schemathesis (a test dependency, ``pip install -e .[dev]``) reads /openapi.json, where the
bucketserve app declares its request bodies (``server/openapi.py``), and generates requests
that fit the schema ("positive") and requests that break it ("negative"). They are sent with
a few threads in parallel; the report counts the status codes, the 5xx answers and the hangs
(no reply within the timeout), and asks the server for one normal completion afterwards.
Used by ``benchmarks/fuzz_api.py`` (1,000+ requests) and ``tests/test_api_fuzz.py`` (CI).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class FuzzReport:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    hangs: int = 0  # no reply within the timeout
    failures: list[str] = field(default_factory=list)  # each 5xx, hang or broken connection
    still_serves: bool = False

    @property
    def num_requests(self) -> int:
        return sum(self.statuses.values()) + self.hangs + self.num_broken

    @property
    def num_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def num_broken(self) -> int:
        return sum(1 for f in self.failures if f.startswith("broken"))

    @property
    def passed(self) -> bool:
        return self.num_5xx == 0 and self.hangs == 0 and self.num_broken == 0 and self.still_serves

    def lines(self) -> list[str]:
        histogram = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items()))
        return [
            f"requests: {self.num_requests}",
            f"status codes: {histogram}",
            f"5xx: {self.num_5xx}",
            f"hangs (no reply within the timeout): {self.hangs}",
            f"broken connections: {self.num_broken}",
            f"still serves a normal request afterwards: {'yes' if self.still_serves else 'NO'}",
            *(f"  {f}" for f in self.failures[:20]),
        ]


def generate_cases(
    base_url: str, num_cases: int, seed: int = 0, paths: Sequence[str] = GENERATION_PATHS
) -> list:
    """About ``num_cases`` schemathesis cases, split evenly over ``paths`` and over valid and
    invalid bodies; reproducible for one ``seed`` and one schema."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings

    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.path in paths and op.method.upper() == "POST"]
    if len(operations) != len(paths):
        raise RuntimeError(f"the OpenAPI document lacks some of {list(paths)}")
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    per_strategy = max(1, num_cases // (len(operations) * len(modes)))
    cases: list = []
    for op in operations:
        for mode in modes:

            @settings(
                max_examples=per_strategy,
                database=None,  # nothing saved between runs: a run depends on its seed alone
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.seed(seed)
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def collect(case: Any) -> None:
                cases.append(case)

            collect()
    return cases


def _send(case: Any, base_url: str, timeout: float) -> tuple[int | None, str]:
    """The case's status (None: no answer in time, or a broken connection) and a description."""
    import requests

    what = f"{case.method} {case.path} {json.dumps(case.body, default=str)[:300]}"
    try:
        return case.call(base_url=base_url, timeout=timeout).status_code, what
    except requests.Timeout:
        return None, "hang: " + what
    except requests.RequestException as e:
        return None, f"broken ({type(e).__name__}): {what}"


def serves_normally(base_url: str, model: str | None = None, timeout: float = 30.0) -> bool:
    """Whether a plain four-token completion comes back whole."""
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 4}
    if model is not None:
        body["model"] = model
    try:
        r = httpx.post(base_url.rstrip("/") + "/v1/completions", json=body, timeout=timeout)
        return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is not None
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return False


def fuzz(
    base_url: str, num_cases: int, seed: int = 0, timeout: float = 60.0, concurrency: int = 8
) -> FuzzReport:
    """Generate about ``num_cases`` requests, send them ``concurrency`` at a time, then check
    that the server still serves."""
    cases = generate_cases(base_url, num_cases, seed)
    report = FuzzReport()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for status, what in pool.map(lambda c: _send(c, base_url, timeout), cases):
            if status is None:
                report.hangs += what.startswith("hang")
                report.failures.append(what)
                continue
            report.statuses[status] += 1
            if status >= 500:
                report.failures.append(f"{status}: {what}")
    report.still_serves = serves_normally(base_url)
    return report
