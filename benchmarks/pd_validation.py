"""The disaggregated simulation beside a real prefill/decode run, on this machine.

Steps (each a documented command, run here in order):
  1. profile the engine with one thread (what each replica has), unless the profile exists:
       bucketserve profile --num-threads 1 --kv-cache-memory 1GiB --max-model-len 2048 -o PROFILE
  2. serve it disaggregated, one prefill and one decode replica of one thread each:
       bucketserve serve --prefill-replicas 1 --decode-replicas 1 --threads-per-replica 1 \\
           --kv-cache-memory 1GiB --max-model-len 2048
  3. send a ShareGPT sample at a Poisson rate and keep the per-request records:
       bucketserve bench run --dataset sharegpt --num-prompts N --request-rate R \\
           --max-output-len 128 --output-json RUN.json
     and read the mean KV transfer time from the server's /metrics;
  4. replay the same arrivals and lengths in the simulator, a prefill and a decode instance
     with that profile and that transfer time, and compare output throughput, TTFT p50 and
     TPOT p50 (target: within 20%):
       bucketserve simulate --validate RUN.json:bucket --profile PROFILE --kv-cache-memory 1GiB \\
           --disaggregated --kv-transfer-latency SECONDS --target 0.2

How to run (a quiet machine):
    .venv/bin/python benchmarks/pd_validation.py --num-prompts 60 --rate 1.0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bucketserve.bench.servers import managed_server

BIN = Path(sys.executable).parent / "bucketserve"
ENGINE = ["--kv-cache-memory", "1GiB", "--max-model-len", "2048"]


def kv_transfer_mean_s(url: str) -> tuple[float, int]:
    text = httpx.get(url + "/metrics", timeout=60).text
    total, count = 0.0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "bucketserve:kv_transfer_seconds":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
    return (total / count if count else 0.0), int(count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--rate", type=float, default=1.0, help="Poisson requests/s")
    p.add_argument("--profile", type=Path, default=Path("results/sim/profile-cpu-1thread.json"))
    p.add_argument("--output-dir", type=Path, default=Path("results/sim"))
    p.add_argument("--policy", default="bucket", help="the servers' policy (prefill and decode)")
    a = p.parse_args()
    a.output_dir.mkdir(parents=True, exist_ok=True)
    if not a.profile.exists():
        subprocess.run([BIN, "profile", "--num-threads", "1", *ENGINE, "-o", a.profile], check=True)
    run_json = a.output_dir / f"pd-run-{a.policy}.json"
    server = ["--prefill-replicas", "1", "--decode-replicas", "1", "--threads-per-replica", "1", *ENGINE]
    with managed_server(a.policy, server, a.output_dir / "pd-run.server.log") as url:
        subprocess.run(
            [BIN, "bench", "run", "--base-url", url, "--dataset", "sharegpt",
             "--num-prompts", str(a.num_prompts), "--request-rate", str(a.rate),
             "--max-output-len", "128", "--max-total-len", "2048",
             "--output-json", run_json],
            check=True,
        )  # fmt: skip
        latency, transfers = kv_transfer_mean_s(url)
    print(f"KV transfers: {transfers}, mean {latency * 1e3:.1f} ms")
    out = subprocess.run(
        [BIN, "simulate", "--validate", f"{run_json}:{a.policy}", "--profile", a.profile, *ENGINE[:2],
         "--max-model-len", "2048", "--disaggregated", "--kv-transfer-latency", f"{latency:.6f}",
         "--target", "0.2"],
    )  # fmt: skip
    sys.exit(out.returncode)


if __name__ == "__main__":
    main()
