"""Validation replays a bench result file: a run the simulator itself produced must come back
with zero error, and the CLI reads FILE:POLICY."""

from __future__ import annotations

import json

import pytest

from bucketserve.cli import main
from bucketserve.config import SchedulerConfig
from bucketserve.sim.cost_model import load_profile
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate
from bucketserve.sim.validate import read_bench, validate_run

LINEAR = {
    "prefill": [10.0, 0.5, 0.0],
    "decoding_smallbs": [5.0, 0.001, 0.2],
    "decoding_largebs": [5.0, 0.001, 0.2],
}


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "linear.json"
    entry = {**LINEAR, "decoding_large_small_bs_threshold": 1 << 30, "kv_bytes_per_token": 1024}
    path.write_text(json.dumps({"toy": {"1": entry}, "meta": {}}))
    return path


def bench_file(tmp_path, profile_path, policy: str):
    """A bench-shaped result whose 'measurements' come from the simulator itself."""
    profile, _ = load_profile(str(profile_path))
    requests = [SimRequest(0.05 * i, 20 + (37 * i) % 200, 2 + (11 * i) % 30) for i in range(60)]
    cfg = SimConfig(
        SchedulerConfig(policy=policy, max_num_seqs=128, max_num_batched_tokens=1024),
        InstanceSpec(profile, (1 << 20) // 1024),
        max_model_len=8192,
    )
    result = simulate(cfg, requests)
    rows = [
        {
            "sent": r.arrival,
            "ttft": r.ttft,
            "e2el": r.e2e,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "error": None,
        }
        for r in result.records
    ]
    rows.append(
        {"sent": 9.0, "ttft": None, "e2el": None, "prompt_tokens": 5, "output_tokens": 0, "error": "HTTP 500"}
    )
    path = tmp_path / f"{policy}.json"
    path.write_text(json.dumps({"config": {}, "summary": {}, "requests": rows}))
    return path


def test_read_bench_rebuilds_records_with_errors_kept(tmp_path, profile_path):
    [run] = read_bench(bench_file(tmp_path, profile_path, "continuous"))
    records = run.records
    assert len(records) == 61
    assert records[-1].error == "HTTP 500" and records[0].ok
    assert records[0].ttft > 0


@pytest.mark.parametrize("policy", ["bucket", "continuous", "static"])
def test_a_simulated_run_validates_with_zero_error(tmp_path, profile_path, policy):
    path = bench_file(tmp_path, profile_path, policy)
    [c] = validate_run(
        path,
        str(profile_path),
        1 << 20,
        policy=policy,
        scheduler={"max_num_seqs": 128, "max_num_batched_tokens": 1024},
    )
    for metric in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms"):
        assert c.error(metric) == pytest.approx(0.0, abs=1e-9)


def test_validate_needs_the_policy(tmp_path, profile_path):
    path = bench_file(tmp_path, profile_path, "bucket")
    with pytest.raises(ValueError, match="policy"):
        validate_run(path, str(profile_path), 1 << 20)


def test_a_compare_file_validates_each_server_under_its_policy(tmp_path, profile_path):
    runs = {p: json.loads(bench_file(tmp_path, profile_path, p).read_text()) for p in ("bucket", "static")}
    compare = {
        "config": {},
        "servers": {p: {"points": [{"request_rate": 2.0, **run}]} for p, run in runs.items()},
    }
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(compare))
    out = validate_run(path, str(profile_path), 1 << 20)
    assert [c.policy for c in out] == ["bucket", "static"]
    assert all(abs(c.error("output_throughput")) < 1e-9 for c in out)


def test_cli_validate_reads_file_colon_policy(tmp_path, profile_path, capsys):
    path = bench_file(tmp_path, profile_path, "continuous")
    rc = main(
        [
            "simulate",
            "--validate",
            f"{path}:continuous",
            "--profile",
            str(profile_path),
            "--kv-cache-memory",
            "1MiB",
            "--max-model-len",
            "8192",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| continuous | continuous |" in out and "+0.0%" in out
