"""The wire formats: every record comes back equal through to_dict/from_dict and through a
JSON file, non-finite numbers are written as null (standard JSON) and read back from older
files that hold NaN literals, and the server imports nothing from the simulator."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bucketserve.core.scheduler import BatchShape
from bucketserve.metrics import RequestRecord
from bucketserve.wire import (
    MeasuredRun,
    Profile,
    ProfileFile,
    RequestRow,
    StepSample,
    dumps,
    read_json,
    write_json,
)

ROW = RequestRow(
    scheduled=0.5,
    sent=0.75,
    admitted=0.8,
    ttft=0.125,
    e2el=1.5,
    tpot=0.0625,
    itls=[0.0625, 0.0625],
    prompt_tokens=17,
    output_tokens=3,
    streamed_chunks=3,
    usage_output_tokens=3,
)
FAILED = RequestRow(sent=2.0, ttft=None, e2el=0.25, prompt_tokens=5, output_tokens=0, error="HTTP 500")
STEP = StepSample(12.5, 0.03125, BatchShape(prefill=((64, 0), (16, 32)), decode=(100, 7)))
PADDED_STEP = StepSample(13.0, 0.5, BatchShape(prefill=((8, 0),), padded=True, num_ghost_rows=2))
PROFILE = Profile(
    prefill=(10.0, 0.5, 0.001),
    decode_small=(5.0, 0.01, 0.25),
    decode_large=(4.0, 0.02, 0.5),
    large_batch_threshold=32,
    step_overhead=(0.5, 0.03),
    mixed_scale=1.25,
    padded_decode=False,
    kv_bytes_per_token=4096,
    weight_bytes=270_000_000,
)


def through_file(data: dict, tmp_path: Path) -> dict:
    path = tmp_path / "x.json"
    write_json(path, data)
    return read_json(path)


@pytest.mark.parametrize("row", [ROW, FAILED], ids=["ok", "failed"])
def test_a_request_row_round_trips(row: RequestRow, tmp_path: Path) -> None:
    assert RequestRow.from_dict(row.to_dict()) == row
    assert RequestRow.from_dict(through_file(row.to_dict(), tmp_path)) == row


@pytest.mark.parametrize("step", [STEP, PADDED_STEP], ids=["ragged", "padded"])
def test_a_step_sample_round_trips_flat(step: StepSample, tmp_path: Path) -> None:
    d = step.to_dict()
    assert set(d) == {"start", "duration", "prefill", "decode", "padded", "ghost_rows"}
    assert StepSample.from_dict(d) == step
    assert StepSample.from_dict(through_file(d, tmp_path)) == step


def test_a_step_sample_carries_its_scheduling_time_where_it_was_recorded(tmp_path: Path) -> None:
    timed = dataclasses.replace(STEP, schedule_time=0.000412)
    d = timed.to_dict()
    assert d["schedule_time"] == 0.000412
    assert StepSample.from_dict(through_file(d, tmp_path)) == timed
    assert StepSample.from_dict(STEP.to_dict()).schedule_time is None  # an older file: not known


def test_a_measured_run_round_trips_with_and_without_steps(tmp_path: Path) -> None:
    run = MeasuredRun({"completed": 1, "failed": 1, "mean_itl_ms": 62.5}, [ROW, FAILED], [STEP, PADDED_STEP])
    assert MeasuredRun.from_dict(run.to_dict()) == run
    assert MeasuredRun.from_dict(through_file(run.to_dict(), tmp_path)) == run
    no_steps = MeasuredRun({}, [ROW])
    assert no_steps.to_dict()["steps"] is None  # not a bucketserve server
    assert MeasuredRun.from_dict(through_file(no_steps.to_dict(), tmp_path)) == no_steps


def test_a_profile_and_its_file_round_trip(tmp_path: Path) -> None:
    assert Profile.from_dict(PROFILE.to_dict()) == PROFILE
    published = Profile(prefill=(1.0, 2.0, 3.0), decode_small=(4.0, 5.0, 6.0), decode_large=(7.0, 8.0, 9.0))
    assert "kv_bytes_per_token" not in published.to_dict()  # sizes only where known
    file = ProfileFile({"tiny": {1: PROFILE, 2: published}}, {"device": "cpu", "points": [[1, 16, 2.5]]})
    back = ProfileFile.from_dict(through_file(file.to_dict(), tmp_path), "src")
    assert back.meta == file.meta
    assert back.models["tiny"][1] == dataclasses.replace(PROFILE, name="src:tiny:tp1")
    assert back.models["tiny"][2].prefill == (1.0, 2.0, 3.0)


def test_a_published_profile_reads_with_distserve_keys_only() -> None:
    entry = {"prefill": [1, 2, 3], "decoding_smallbs": [4, 5, 6], "decoding_largebs": [7, 8, 9]}
    p = Profile.from_dict({**entry, "decoding_large_small_bs_threshold": 95})
    assert (p.prefill, p.large_batch_threshold, p.padded_decode) == ((1.0, 2.0, 3.0), 95, True)
    assert (p.step_overhead, p.mixed_scale, p.kv_bytes_per_token) == ((0.0, 0.0), 1.0, None)


def test_non_finite_numbers_are_written_as_null_and_the_text_is_standard_json(tmp_path: Path) -> None:
    data = {"nan": math.nan, "inf": [math.inf, -math.inf], "ok": 1.5, "nested": {"t": (1, math.nan)}}
    text = dumps(data)

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not standard JSON")

    assert json.loads(text, parse_constant=refuse) == {
        "nan": None,
        "inf": [None, None],
        "ok": 1.5,
        "nested": {"t": [1, None]},
    }
    path = tmp_path / "out" / "x.json"
    write_json(path, data)
    assert path.read_text() == text + "\n"


def test_older_files_with_nan_literals_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(
        '{"requests": [{"sent": 0.5, "ttft": NaN, "e2e": 1.0, "prompt_tokens": 4}], "cap": Infinity}'
    )
    data = read_json(path)
    assert data["cap"] == math.inf
    row = RequestRow.from_dict(data["requests"][0])  # an older row: e2e, no output_tokens
    assert (row.ttft, row.e2el, row.output_tokens) == (None, 1.0, 0)


def test_a_failed_request_record_becomes_a_row_without_latencies_and_back() -> None:
    record = RequestRecord(1.0, math.nan, 1.25, prompt_tokens=9, output_tokens=0, error="timeout")
    row = RequestRow.from_record(record, scheduled=0.9)
    assert (row.sent, row.ttft, row.e2el, row.tpot, row.error) == (1.0, None, 0.25, None, "timeout")
    back = row.to_record()
    assert (back.arrival, back.finished, back.error) == (1.0, 1.25, "timeout")
    assert math.isnan(back.first_token)


def test_a_measured_request_record_keeps_its_latencies_through_a_row() -> None:
    record = RequestRecord(2.0, 2.5, 3.5, prompt_tokens=9, output_tokens=3, itls=[0.5, 0.5])
    row = RequestRow.from_record(record)
    assert (row.ttft, row.e2el, row.tpot) == (0.5, 1.5, 0.5)
    assert row.to_record() == record


def test_something_that_is_not_json_data_is_refused() -> None:
    with pytest.raises(TypeError, match="to_dict"):
        dumps({"step": STEP})


def test_the_server_imports_nothing_from_the_simulator() -> None:
    code = (
        "import sys, bucketserve.server.app, bucketserve.server.launch\n"
        "print(sorted(m for m in sys.modules if m.startswith('bucketserve.sim')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_wire_formats_need_neither_torch_nor_the_server_nor_the_simulator() -> None:
    code = (
        "import sys, bucketserve.wire\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'fastapi', 'bucketserve.sim',"
        " 'bucketserve.server', 'bucketserve.engine'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
