"""How long the simulator takes for 10,000 requests (target: under 60 s on this machine).

    .venv/bin/python benchmarks/sim_speed.py [--num-requests 10000] [--policies bucket,...]

Mixed workload (synthetic Alpaca-like + LongBench-like lengths), Poisson arrivals at a rate
every policy but static/uellm keeps up with, on the paper's 4 x A100-40GB setup.
"""

from __future__ import annotations

import argparse
import time

from bucketserve.core.policies import policy_names
from bucketserve.sim.experiments import Setup, requests_for
from bucketserve.sim.simulator import simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson req/s (default 4)")
    p.add_argument("--policies", default=",".join(policy_names()))
    a = p.parse_args()
    requests = requests_for("mixed", a.num_requests, a.rate, seed=0)
    setup = Setup()
    print(f"{a.num_requests} mixed requests, Poisson {a.rate}/s, {setup.num_gpus} x A100-40GB (simulated)")
    print("| policy | wall (s) | simulated span (s) | steps | requests/wall s |")
    print("|---|---|---|---|---|")
    for policy in a.policies.split(","):
        t0 = time.perf_counter()
        result = simulate(setup.config(policy), requests)
        wall = time.perf_counter() - t0
        print(
            f"| {policy} | {wall:.1f} | {result.duration:.0f} | {result.steps} | "
            f"{a.num_requests / wall:,.0f} |"
        )


if __name__ == "__main__":
    main()
