"""Property-based fuzzing of /v1/completions and /v1/chat/completions from the server's own
OpenAPI document (schemathesis; ``bucketserve.bench.fuzz``).

What it measures
    About --requests generated requests, half fitting the request schemas and half breaking
    them, split over both endpoints and sent --concurrency at a time; then one normal
    completion. Prints the number of requests, the status-code histogram, the 5xx answers,
    the hangs (no reply within --timeout) and whether the server still serves. Target (issue
    12): 0 5xx, 0 hangs, still serving, over at least 1,000 requests.

How to run
    .venv/bin/python benchmarks/fuzz_api.py --model PATH       # starts `bucketserve serve`
    .venv/bin/python benchmarks/fuzz_api.py --url http://127.0.0.1:8000   # a running server
The server it starts caps the context (--max-model-len) so that no generated max_tokens can
keep it busy for minutes; any model works, a small one is fastest.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from bucketserve.bench.fuzz import fuzz
from bucketserve.bench.servers import managed_server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="fuzz this running server instead of starting one")
    p.add_argument("--model", help="the model `bucketserve serve` loads (default: its own default)")
    p.add_argument("--max-model-len", type=int, default=256, help="the started server's context")
    p.add_argument("--serve-args", default="", help="more `bucketserve serve` options, one string")
    p.add_argument("--requests", type=int, default=1000, help="generated requests, about")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds without a reply = a hang")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    def run(url: str) -> bool:
        start = time.perf_counter()
        report = fuzz(url, a.requests, a.seed, a.timeout, a.concurrency)
        print("\n".join(report.lines()))
        print(f"wall time: {time.perf_counter() - start:.1f} s")
        print("verdict:", "PASS" if report.passed else "FAIL")
        return report.passed

    if a.url:
        return 0 if run(a.url) else 1
    serve_args = ["--max-model-len", str(a.max_model_len), *shlex.split(a.serve_args)]
    if a.model:
        serve_args += ["--model", a.model]
    with managed_server(None, serve_args) as url:
        return 0 if run(url) else 1


if __name__ == "__main__":
    sys.exit(main())
