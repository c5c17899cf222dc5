"""`bucketserve bench run | sweep | compare` end to end against fake servers, and the lifecycle
of the servers `compare` starts itself."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import httpx
import pytest
from conftest import build_tokenizer
from fake_openai_server import FakeServer

from bucketserve.bench import compare, servers
from bucketserve.bench.runner import RunResult
from bucketserve.cli import main
from bucketserve.core.scheduler import BatchShape
from bucketserve.sim.validate import read_bench
from bucketserve.wire import StepSample


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return str(path)


def workload_args(tokenizer_dir: str, n: int = 4) -> list[str]:
    return ["--tokenizer", tokenizer_dir, "--dataset", "fixed", "--num-prompts", str(n),
            "--prompt-len", "16", "--output-len", "5", "--no-progress"]  # fmt: skip


def test_run_prints_the_table_and_writes_config_summary_and_records(
    tokenizer_dir: str, tmp_path: Path, capsys
):
    out = tmp_path / "run.json"
    with FakeServer(0.01, 0.005) as server:
        code = main(["bench", "run", "--base-url", server.url, *workload_args(tokenizer_dir),
                     "--goodput", "ttft:1000", "tpot:500", "--output-json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"Successful requests:\s+4", printed) and "SLO attainment:" in printed
    data = json.loads(out.read_text())
    assert data["config"]["dataset"] == "fixed" and data["config"]["base_url"] == server.url
    assert data["summary"]["completed"] == 4 and data["summary"]["slo_attainment"] == 1.0
    assert len(data["requests"]) == 4 and all(r["output_tokens"] == 5 for r in data["requests"])
    assert data["steps"] is None  # not a bucketserve server: no /debug/steps
    assert all(b["model"] == "fake-model" and b["max_tokens"] == 5 for b in server.bodies)


def test_run_against_a_failing_server_reports_the_failures_and_exits_1(tokenizer_dir: str, capsys) -> None:
    with FakeServer(mode="error") as server:
        code = main(["bench", "run", "--base-url", server.url, "--model", "m", *workload_args(tokenizer_dir)])
    assert code == 1
    printed = capsys.readouterr().out
    assert re.search(r"Failed requests:\s+4", printed) and re.search(r"HTTP 500:\s+4", printed)


def test_sweep_writes_attainment_per_rate_load_capacity_and_a_plot(
    tokenizer_dir: str, tmp_path: Path, capsys
):
    with FakeServer(0.01, 0.005) as server:
        code = main(["bench", "sweep", "--base-url", server.url, *workload_args(tokenizer_dir),
                     "--request-rates", "50,100", "--goodput", "ttft:2000",
                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "sweep-fixed.json").read_text())
    assert [p["request_rate"] for p in data["points"]] == [50, 100]
    assert all(p["summary"]["slo_attainment"] == 1.0 for p in data["points"])
    assert data["load_capacity"] == 100  # never below the target: the highest rate
    assert (tmp_path / "sweep-fixed.png").read_bytes()[:4] == b"\x89PNG"
    assert "load capacity at 80% SLO attainment" in capsys.readouterr().out


def test_sweep_warm_up_requests_are_sent_first_and_not_measured(tokenizer_dir: str, tmp_path: Path):
    with FakeServer(0.01, 0.005) as server:
        code = main(["bench", "sweep", "--base-url", server.url, *workload_args(tokenizer_dir),
                     "--request-rates", "50,100", "--warmup-requests", "3",
                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert len(server.bodies) == 3 + 2 * 4  # the warm-up, then 4 requests per rate
    data = json.loads((tmp_path / "sweep-fixed.json").read_text())
    assert [p["summary"]["requests"] for p in data["points"]] == [4, 4]


def test_compare_runs_the_same_workload_on_each_url_and_tells_them_apart(tokenizer_dir: str, tmp_path: Path):
    with FakeServer(0.01, 0.005) as fast, FakeServer(0.3, 0.005) as slow:
        code = main(["bench", "compare", "--url", f"fast={fast.url}", "--url", f"slow={slow.url}",
                     *workload_args(tokenizer_dir), "--goodput", "ttft:200",
                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert sorted(b["prompt"] for b in fast.bodies) == sorted(b["prompt"] for b in slow.bodies)
    data = json.loads((tmp_path / "compare-fixed.json").read_text())
    attainment = {n: s["points"][0]["summary"]["slo_attainment"] for n, s in data["servers"].items()}
    assert attainment == {"fast": 1.0, "slow": 0.0}
    assert (tmp_path / "compare-fixed.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_starts_each_server_with_its_own_arguments_and_reports_each_length_class(
    tokenizer_dir: str, tmp_path: Path, monkeypatch, capsys
):
    started = []

    @contextlib.contextmanager
    def fake_managed(policy, extra, log=None, timeout=0.0):  # type: ignore[no-untyped-def]
        started.append((policy, list(extra)))
        with FakeServer(0.01, 0.005) as server:
            yield server.url

    monkeypatch.setattr(compare, "managed_server", fake_managed)
    code = main(["bench", "compare", "--server-args=--kv-cache-memory 1GiB", "--server", "defaults=",
                 "--server", "c2048=--policy continuous --max-num-batched-tokens 2048",
                 *workload_args(tokenizer_dir), "--slo-classes", "8:1:-,64:0.005:-",
                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert started == [
        (None, ["--kv-cache-memory", "1GiB"]),
        (None, ["--kv-cache-memory", "1GiB", "--policy", "continuous", "--max-num-batched-tokens", "2048"]),
    ]
    # The 16-token prompts fall in the second class, whose 5-ms TTFT a 10-ms server misses.
    data = json.loads((tmp_path / "compare-fixed.json").read_text())
    summary = data["servers"]["c2048"]["points"][0]["summary"]
    assert summary["slo_attainment"] == 0.0
    assert summary["slo_classes"]["<=64"]["requests"] == 4 and "<=8" not in summary["slo_classes"]
    assert summary["slo_classes"]["<=64"]["missed"]["ttft"] == 4  # replied, each first token late
    out = capsys.readouterr().out
    assert "by length class:" in out and "missed: failed/TTFT/TPOT" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["c2048"] and "<=64" in line)
    assert row.split()[-1] == "0/4/0"  # missed: none failed, four late, none slow


def test_compare_goes_on_past_a_server_that_fails_to_start(
    tokenizer_dir: str, tmp_path: Path, monkeypatch, capsys
):
    @contextlib.contextmanager
    def fake_managed(policy, extra, log=None, timeout=0.0):  # type: ignore[no-untyped-def]
        if "--broken" in extra:
            raise servers.ServerStartError("the server exited with status 2")
        with FakeServer(0.01, 0.005) as server:
            yield server.url

    monkeypatch.setattr(compare, "managed_server", fake_managed)
    code = main(["bench", "compare", "--server", "bad=--broken", "--server", "good=",
                 *workload_args(tokenizer_dir), "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert "bad: not measured: the server exited with status 2" in capsys.readouterr().err
    assert list(json.loads((tmp_path / "compare-fixed.json").read_text())["servers"]) == ["good"]


def test_compare_interleaved_runs_every_server_at_a_rate_before_the_next_alternating_their_order(
    tokenizer_dir: str, tmp_path: Path, monkeypatch
):
    events = []

    @contextlib.contextmanager
    def fake_managed(policy, extra, log=None, timeout=0.0):  # type: ignore[no-untyped-def]
        name = extra[-1]
        events.append(("up", name))
        with FakeServer(0.01, 0.005) as server:
            yield server.url
        events.append(("down", name))

    real_sweep = compare.run_sweep

    async def logged_sweep(workload, rates, cfg, **kwargs):  # type: ignore[no-untyped-def]
        events.append((kwargs["label"], tuple(rates), kwargs["warmup_requests"]))
        return await real_sweep(workload, rates, cfg, **kwargs)

    monkeypatch.setattr(compare, "managed_server", fake_managed)
    monkeypatch.setattr(compare, "run_sweep", logged_sweep)
    code = main(["bench", "compare", "--server", "a=--tag a", "--server", "b=--tag b",
                 "--interleave", *workload_args(tokenizer_dir), "--request-rates", "50,100,200",
                 "--warmup-requests", "2", "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert events == [
        ("up", "a"), ("up", "b"),  # all servers up before the first run
        ("a", (50,), 2), ("b", (50,), 2),  # each warmed up before its first run only
        ("b", (100,), 0), ("a", (100,), 0),  # the order reversed at the next rate
        ("a", (200,), 0), ("b", (200,), 0),
        ("down", "b"), ("down", "a"),
    ]  # fmt: skip
    data = json.loads((tmp_path / "compare-fixed.json").read_text())
    assert {n: [p["request_rate"] for p in s["points"]] for n, s in data["servers"].items()} == {
        "a": [50, 100, 200],
        "b": [50, 100, 200],
    }


def test_compare_rounds_are_named_apart_and_their_attainment_pooled_per_server(
    tokenizer_dir: str, tmp_path: Path, capsys
):
    with FakeServer(0.01, 0.005) as fast, FakeServer(0.3, 0.005) as slow:
        code = main(["bench", "compare", "--url", f"fast={fast.url}", "--url", f"slow={slow.url}",
                     "--interleave", "--rounds", "2", *workload_args(tokenizer_dir),
                     "--request-rates", "50,100", "--warmup-requests", "1", "--goodput", "ttft:200",
                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert len(fast.bodies) == len(slow.bodies) == 1 + 2 * 2 * 4  # one warm-up, 2 rounds x 2 rates x 4
    data = json.loads((tmp_path / "compare-fixed.json").read_text())
    assert list(data["servers"]) == ["fast#1", "fast#2", "slow#1", "slow#2"]
    assert data["pooled_load_capacity"] == {"fast": 100, "slow": None}  # None: below the lowest rate
    printed = capsys.readouterr().out
    pooled = printed[printed.index("pooled over the rounds") :]
    assert "fast: >= 100" in pooled and "slow: below the lowest rate" in pooled
    repeats = printed[printed.index("over the rounds: median") :].splitlines()
    assert sum(r.split()[:1] in (["fast"], ["slow"]) for r in repeats) == 4  # 2 servers x 2 rates
    assert "engine steps" not in printed  # servers that report no steps: no step table


def test_pooled_capacity_is_the_capacity_of_the_mean_attainment_over_rounds() -> None:
    def point(rate: float, attainment: float) -> compare.SweepPoint:
        return compare.SweepPoint(rate, {"slo_attainment": attainment}, None)  # type: ignore[arg-type]

    curves = {
        "x#1": [point(1, 1.0), point(2, 0.9), point(3, 0.5)],
        "x#2": [point(1, 1.0), point(2, 0.7), point(3, 0.5)],
        "y": [point(1, 1.0), point(2, 0.0)],  # not run in rounds: not pooled
    }
    pooled = compare.pooled_capacities(curves, 0.8)
    assert list(pooled) == ["x"]
    assert pooled["x"] == pytest.approx(2.0)  # mean 0.8 at 2 req/s; each round alone: 2.25 and 1.67
    assert compare.capacity(curves["x#1"], 0.8) == pytest.approx(2.25)


def test_the_repeats_table_gives_each_servers_median_and_spread_over_the_rounds() -> None:
    def point(rate: float, attainment: float, chat_ttft_p99: float, tpot: float) -> compare.SweepPoint:
        classes = {"<=256": {"p99_ttft_ms": chat_ttft_p99}, "<=2048": {"p99_ttft_ms": 9999.0}}
        summary = {"slo_attainment": attainment, "median_tpot_ms": tpot, "slo_classes": classes}
        return compare.SweepPoint(rate, summary, None)  # type: ignore[arg-type]

    curves = {
        "x#1": [point(2, 1.0, 300, 40.0), point(4, 0.9, 800, 90.0)],
        "x#2": [point(2, 0.8, 900, 70.0), point(4, 0.7, 700, 95.0)],
        "x#3": [point(2, 0.9, 500, 55.0), point(4, 0.5, 600, 99.0)],
        "y": [point(2, 1.0, 100, 10.0)],  # not run in rounds: no row
    }
    rows = compare.format_repeats_table(curves).splitlines()
    assert "TTFT p99 (1st class)" in rows[1]
    x2 = next(r for r in rows if r.split()[:2] == ["x", "2.00"]).split()
    assert x2[2:] == ["3", "0.90", "[0.80-1.00]", "500", "[300-900]", "55.0", "[40.0-70.0]"]
    x4 = next(r for r in rows if r.split()[:2] == ["x", "4.00"]).split()
    assert x4[2:] == ["3", "0.70", "[0.50-0.90]", "700", "[600-800]", "95.0", "[90.0-99.0]"]
    assert not any(r.split()[:1] == ["y"] for r in rows)
    assert compare.format_repeats_table({"y": curves["y"]}) == ""


def test_the_step_table_splits_each_runs_engine_time_into_prompt_and_decode_only_steps() -> None:
    def step(duration: float, prompt: tuple[tuple[int, int], ...] = ()) -> StepSample:
        return StepSample(0.0, duration, BatchShape(prompt, (100, 120)))

    def point(scale: float) -> compare.SweepPoint:
        steps = [step(0.2 * scale, ((300, 0),)), step(0.1 * scale, ((64, 300), (40, 0))), step(0.01 * scale)]
        return compare.SweepPoint(3.0, {}, RunResult([], 1.0, steps))

    curves = {
        "x#1": [point(1.0)],
        "x#2": [point(2.0)],
        "x#3": [point(3.0)],
        "peer": [compare.SweepPoint(3.0, {}, RunResult([], 1.0, None))],  # reported no steps: no row
    }
    rows = compare.format_step_table(curves).splitlines()
    x = next(r for r in rows if r.split()[:1] == ["x"]).split()
    # the median round (scale 2): busy 0.62 s of 1 s, two prompt steps of 0.6 s in all whose
    # prompt tokens are 300 and 104 (median 202), one decode-only step of 0.02 s
    # no decode-only step of 16-64 rows to time the machine by
    assert x[1:] == ["3.00", "0.62", "2", "0.6", "202", "1", "0.0", "n/a"]
    assert not any(r.split()[:1] == ["peer"] for r in rows)
    assert compare.format_step_table({"peer": curves["peer"]}) == ""
    assert "*" not in compare.format_step_table(curves)

    # A long run whose first 6 s fell out of the server's step record: busy over the 4 s the
    # record covers, and the row says it is partial.
    late = [StepSample(6.0, 1.0, BatchShape(((200, 0),), ())), StepSample(7.0, 2.0, BatchShape((), (50,)))]
    cut = compare.format_step_table({"long": [compare.SweepPoint(1.0, {}, RunResult([], 10.0, late))]})
    row = next(r for r in cut.splitlines() if r.split()[:1] == ["long"]).split()
    assert row[1:] == ["1.00", "0.75", "1", "1.0", "200", "1", "2.0", "n/a", "*"]
    assert cut.splitlines()[-1].startswith("* from the first step the server still held")


def test_the_step_table_times_the_machine_in_each_run_by_its_decode_only_steps() -> None:
    """ms per decode row of the decode-only steps of 16-64 rows, median per run, and the runs'
    median [lowest-highest]: a round on a slowed machine shows."""

    def point(row_ms: float) -> compare.SweepPoint:
        steps = [
            StepSample(0.0, 0.2, BatchShape(((300, 0),), (100,) * 20)),  # has prompt tokens: not timed
            StepSample(0.2, 1e-3 * row_ms * 20, BatchShape((), (100,) * 20)),
            StepSample(0.3, 1e-3 * row_ms * 32, BatchShape((), (200,) * 32)),
            StepSample(0.4, 1e-3 * row_ms * 40, BatchShape((), (300,) * 40)),
            StepSample(0.5, 0.05, BatchShape((), (100,) * 4)),  # too few rows: its fixed cost rules
            StepSample(0.6, 0.05, BatchShape((), (900,) * 100)),  # too many: a loaded run's contexts
        ]
        return compare.SweepPoint(3.0, {}, RunResult([], 2.0, steps))

    rows = compare.format_step_table({"x#1": [point(1.2)], "x#2": [point(0.9)], "x#3": [point(1.0)]})
    x = next(r for r in rows.splitlines() if r.split()[:1] == ["x"]).split()
    assert x[-2:] == ["1.00", "[0.90-1.20]"]


def test_compare_refuses_a_hash_in_a_server_name(capsys) -> None:
    assert main(["bench", "compare", "--server", "a#1="]) == 2
    assert "must not contain '#'" in capsys.readouterr().err


def test_compare_refuses_two_servers_of_one_name(capsys) -> None:
    assert main(["bench", "compare", "--server", "a=", "--url", "a=http://127.0.0.1:1"]) == 2
    assert "two servers share a name" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line_and_exit_code_2(capsys) -> None:
    port = servers.free_port()  # nothing listens there
    assert main(["bench", "run", "--base-url", f"http://127.0.0.1:{port}", "--no-progress"]) == 2
    assert "cannot get the model name" in capsys.readouterr().err


def test_compare_refuses_a_bad_url(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "compare", "--url", "fast=localhost:1"])
    assert exit_.value.code == 2 and "NAME=http" in capsys.readouterr().err


# -- servers that compare starts ---------------------------------------------------------------

FAKE_SERVE = (
    "import sys, http.server\n"
    "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
    "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n"
)


@pytest.mark.parametrize("failure", [RuntimeError("benchmark broke"), KeyboardInterrupt()])
def test_a_started_server_is_stopped_on_errors_and_ctrl_c(monkeypatch, failure: BaseException) -> None:
    monkeypatch.setattr(
        servers,
        "server_command",
        lambda port, policy, extra: [sys.executable, "-c", FAKE_SERVE, "--port", str(port)],
    )
    with pytest.raises(type(failure)), servers.managed_server("bucket") as url:
        assert httpx.get(url + "/health").status_code == 200
        raise failure
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_a_server_that_exits_at_start_up_is_reported_with_its_log(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        servers, "server_command", lambda port, policy, extra: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    log = tmp_path / "server.log"
    with (
        pytest.raises(servers.ServerStartError, match="status 3"),
        servers.managed_server("bucket", log_path=log),
    ):
        pass


def test_compare_starts_a_real_server_per_policy_and_stops_it(tiny_model_dir: Path, tmp_path: Path, capsys):
    server_args = (
        f"--model {tiny_model_dir} --dtype float32 --device cpu --kv-cache-memory 1MiB --num-threads 1"
    )
    code = main(["bench", "compare", "--policies", "continuous", f"--server-args={server_args}",
                 "--tokenizer", str(tiny_model_dir), "--dataset", "fixed", "--num-prompts", "3",
                 "--prompt-len", "8", "--output-len", "4", "--max-total-len", "64", "--no-progress",
                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "compare-fixed.json").read_text())
    point = data["servers"]["continuous"]["points"][0]
    assert point["summary"]["completed"] == 3 and point["summary"]["total_output_tokens"] == 12
    # The server's steps during the run come along, in the run's clock: the three 8-token
    # prompts prefill (together or not), and 3 x 3 more tokens decode after them.
    steps = point["steps"]
    assert sum(n for s in steps for n, _ in s["prefill"]) == 3 * 8
    assert sum(len(s["decode"]) for s in steps) == 3 * 3
    assert all(0 <= s["start"] <= point["summary"]["duration_s"] for s in steps)
    # ... and when the server's engine took each request in, after the client sent it.
    assert all(0 <= r["sent"] <= r["admitted"] <= r["sent"] + r["ttft"] for r in point["requests"])
    [run] = read_bench(tmp_path / "compare-fixed.json")
    assert run.policy == "continuous" and run.steps is not None and len(run.steps) == len(steps)
    log = (tmp_path / "server-continuous.log").read_text()
    url = re.search(r"serving on (http://\S+)", log).group(1)  # type: ignore[union-attr]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
