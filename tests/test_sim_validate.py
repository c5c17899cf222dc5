"""Validation replays a bench result file: a run the simulator itself produced must come back
with zero error, and the CLI reads FILE:POLICY."""

from __future__ import annotations

import json
import math

import pytest

from bucketserve.cli import main
from bucketserve.config import SchedulerConfig
from bucketserve.core.cost import step_ms
from bucketserve.core.scheduler import BatchShape
from bucketserve.errors import ConfigError
from bucketserve.sim.cost_model import CostModel, Profile, load_profile
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate
from bucketserve.sim.validate import (
    BenchRun,
    SpeedTrace,
    error_table,
    fitted_profile,
    read_bench,
    recorded_server_args,
    validate_run,
)
from bucketserve.wire import MeasuredRun, RequestRow, StepSample, write_json

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


def bench_file(
    tmp_path,
    profile_path,
    policy: str,
    speed: float | None = None,
    delay: float = 0.0,
    transfer: float | None = None,
    max_num_seqs: int = 128,
):
    """A bench-shaped result whose 'measurements' come from the simulator itself; with
    ``speed``, from a machine that slower, and with steps that say so; with ``delay``, from
    a server whose engine took each request in that long after the client sent it; with
    ``transfer``, from a prefill and a decode instance whose KV transfers take that long."""
    profile = load_profile(str(profile_path))
    requests = [SimRequest(0.05 * i, 20 + (37 * i) % 200, 2 + (11 * i) % 30) for i in range(60)]
    instance = InstanceSpec(profile, (1 << 20) // 1024)
    cfg = SimConfig(
        SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=1024),
        instance,
        decode_instance=None if transfer is None else instance,
        link_bandwidth=math.inf,
        link_latency=transfer or 0.0,
        first_token_at_decode=True,
        max_model_len=8192,
        speed=None if speed is None else (lambda t: speed),
    )
    result = simulate(cfg, requests)
    rows = [
        RequestRow(
            sent=r.arrival - delay,
            admitted=r.arrival if delay else None,
            ttft=r.ttft + delay,
            e2el=r.e2e + delay,
            prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens,
        )
        for r in result.records
    ]
    failed = RequestRow(sent=9.0, ttft=None, e2el=None, prompt_tokens=5, output_tokens=0, error="HTTP 500")
    rows.append(failed)
    steps = None
    if speed is not None:
        shape = BatchShape(decode=(100, 200))
        took = speed * CostModel(profile).shape_time(shape)
        steps = [StepSample(0.01 * i, took, shape) for i in range(int(result.end * 100) + 1)]
    path = tmp_path / f"{policy}.json"
    write_json(path, {"config": {}, **MeasuredRun({}, rows, steps).to_dict()})
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


def test_a_disaggregated_run_validates_as_a_prefill_and_a_decode_instance_with_its_transfer_time(
    tmp_path, profile_path
):
    path = bench_file(tmp_path, profile_path, "bucket", transfer=0.05)
    sched = {"max_num_seqs": 128, "max_num_batched_tokens": 1024}

    def check(**kw):
        [c] = validate_run(path, str(profile_path), 1 << 20, policy="bucket", scheduler=sched, **kw)
        return c

    exact = check(disaggregated=True, kv_transfer_latency=0.05)
    assert all(exact.error(m) == pytest.approx(0.0, abs=1e-9) for m in ("p50_ttft_ms", "p50_tpot_ms"))
    assert check(disaggregated=True).error("p50_ttft_ms") < -0.05  # the transfers' time is missed
    assert check().error("p50_tpot_ms") > 0.05  # one instance decodes while it prefills


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


def test_a_run_on_a_slower_machine_validates_once_its_measured_drift_is_replayed(tmp_path, profile_path):
    path = bench_file(tmp_path, profile_path, "bucket", speed=1.5)
    [c] = validate_run(path, str(profile_path), 1 << 20, policy="bucket")
    assert c.speed_ratio == pytest.approx(1.5)
    assert c.error("output_throughput") > 0.2  # the profile alone thinks the machine faster
    for metric in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms"):
        assert c.error(metric, corrected=True) == pytest.approx(0.0, abs=1e-9)
    assert "drift replayed" in error_table([c]) and "1.50" in error_table([c])


def test_a_speed_trace_follows_the_measured_over_modelled_step_time_in_its_window():
    cost = CostModel(
        Profile(*(tuple(LINEAR[k]) for k in ("prefill", "decoding_smallbs", "decoding_largebs")))
    )
    shape = BatchShape(decode=(64,) * 4)
    est = cost.shape_time(shape)
    # The machine runs as profiled for 20 s, then at a third of the speed for 20 s.
    steps = [StepSample(0.5 * i, est * (1 if i < 40 else 3), shape) for i in range(80)]
    trace = SpeedTrace(steps, cost, window_s=4.0)
    assert trace(5.0) == pytest.approx(1.0)
    assert trace(30.0) == pytest.approx(3.0)
    assert trace.overall == pytest.approx(2.0)
    assert trace(100.0) == pytest.approx(2.0)  # no steps there: the run's overall ratio
    shifted = SpeedTrace(steps, cost, window_s=4.0, offset=25.0)  # sim time 5 = run time 30
    assert shifted(5.0) == pytest.approx(3.0)


def test_requests_enter_the_simulation_when_the_server_admitted_them(tmp_path, profile_path):
    path = bench_file(tmp_path, profile_path, "continuous", delay=0.3)
    [c] = validate_run(path, str(profile_path), 1 << 20, policy="continuous")
    for metric in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms"):
        assert c.error(metric) == pytest.approx(0.0, abs=1e-9)
    # Without the server's arrival times the 300 ms on the way in go missing from the TTFT.
    data = json.loads(path.read_text())
    for row in data["requests"]:
        row.pop("admitted", None)
    path.write_text(json.dumps(data))
    [c] = validate_run(path, str(profile_path), 1 << 20, policy="continuous")
    assert c.error("p50_ttft_ms") < -0.1


def test_a_compare_file_replays_each_server_with_the_arguments_it_was_started_with(tmp_path, profile_path):
    """A server started as `--server tight='--policy continuous'` beside `--server-args
    '--max-num-seqs 2'` ran continuous with two seats: the file records both, and the replay
    uses them (with the command line's 256 seats instead, it would not match)."""
    run = json.loads(bench_file(tmp_path, profile_path, "continuous", max_num_seqs=2).read_text())
    config = {"server_args": "--max-num-seqs 2", "server": ["tight=--policy continuous"], "policies": None}
    assert recorded_server_args(config) == {"tight": ["--max-num-seqs", "2", "--policy", "continuous"]}
    compare = {"config": config, "servers": {"tight#1": {"points": [{"request_rate": 2.0, **run}]}}}
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(compare))
    [c] = validate_run(path, str(profile_path), 1 << 20)
    assert c.policy == "continuous"
    assert all(abs(c.error(m)) < 1e-9 for m in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms"))

    compare["config"] = {}  # a file that does not record how its servers started
    path.write_text(json.dumps(compare))
    [c] = validate_run(path, str(profile_path), 1 << 20, policy="continuous")
    assert c.error("p50_ttft_ms") < -0.1  # 256 seats: nobody waits for one


def test_a_server_argument_serve_refuses_is_a_one_line_error(tmp_path, profile_path):
    run = json.loads(bench_file(tmp_path, profile_path, "bucket").read_text())
    compare = {
        "config": {"server_args": "", "server": ["b=--bucket-no-such-option 1"]},
        "servers": {"b": {"points": [{"request_rate": 2.0, **run}]}},
    }
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(compare))
    with pytest.raises(ConfigError, match="--bucket-no-such-option"):
        validate_run(path, str(profile_path), 1 << 20)


def _steps_at(profile: Profile, slowdown: float, count: int = 200) -> list[StepSample]:
    """Steps of varied shapes (decode-only, prompt-only, mixed), each taking ``slowdown`` x
    what ``profile`` charges it."""
    shapes = []
    for i in range(count):
        prefill = tuple(((17 * i) % 300 + 8, (29 * i) % 400 * (i % 2)) for _ in range(i % 3))
        decode = tuple(100 + (13 * i + 7 * j) % 500 for j in range((5 * i) % 40 + (0 if prefill else 1)))
        shapes.append(BatchShape(prefill, decode))
    return [StepSample(0.05 * i, slowdown * step_ms(profile, s) / 1e3, s) for i, s in enumerate(shapes)]


def test_the_cost_model_fitted_to_a_files_steps_predicts_the_serving_paths_costs(profile_path):
    """Steps measured at twice the profile's times (a server's own work, a slower machine):
    the fit charges every shape, seen or not, twice what the profile does, and keeps the
    profile's KV bytes per token. Too few steps to fit: a one-line error."""
    profile = load_profile(str(profile_path))
    fitted = fitted_profile([BenchRun("r", None, [], _steps_at(profile, 2.0))], profile)
    assert fitted.kv_bytes_per_token == profile.kv_bytes_per_token
    for shape in (
        BatchShape(((700, 0),), ()),
        BatchShape((), (900,) * 60),
        BatchShape(((64, 512),), (300,) * 9),
    ):
        assert step_ms(fitted, shape) == pytest.approx(2 * step_ms(profile, shape), rel=1e-3)
    with pytest.raises(ConfigError, match="too few step records"):
        fitted_profile([BenchRun("r", None, [], _steps_at(profile, 2.0, count=10))], profile)


def test_cli_validate_fits_the_steps_or_says_why_it_cannot(tmp_path, profile_path, capsys):
    path = bench_file(tmp_path, profile_path, "continuous")  # no steps recorded
    code = main(
        ["simulate", "--validate", f"{path}:continuous", "--profile", str(profile_path), "--fit-steps"]
    )
    assert code == 2
    assert "too few step records" in capsys.readouterr().err
