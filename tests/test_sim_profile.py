"""`bucketserve profile --quick` on the tiny random model: a loadable profile whose fit is
positive where it must be, and whose KV size is the engine's."""

from __future__ import annotations

import json

from bucketserve.cli import main
from bucketserve.core.cost import Profile, step_ms
from bucketserve.core.scheduler import BatchShape
from bucketserve.sim.cost_model import load_profile
from bucketserve.sim.profile import NO_SPLIT, Point, fit, fit_decode, fit_prefill


def test_fit_recovers_exact_coefficients():
    xs = [[1.0, 2.0], [3.0, 1.0], [5.0, 7.0], [2.0, 2.0]]
    ys = [4 + 0.5 * a + 2 * b for a, b in xs]
    assert [round(c, 9) for c in fit(xs, ys)] == [4.0, 0.5, 2.0]


def test_fit_decode_splits_rows_where_the_slope_changes():
    # Below batch 16 a step costs 10 + 0.5 per row; from 16 on, 2 per row: two rows fit exactly.
    points = [
        Point(b, c, (10 + 0.5 * b if b < 16 else 2.0 * b) + 0.001 * b * c)
        for b in (1, 2, 4, 8, 16, 32, 64)
        for c in (64, 256)
    ]
    small, large, threshold = fit_decode(points)
    assert threshold == 16
    assert [round(x, 6) for x in small] == [10.0, 0.001, 0.5]
    assert [round(x, 6) for x in large] == [0.0, 0.001, 2.0]


def test_fit_prefill_splits_rows_where_the_step_switches_weight_formats():
    """Up to 16 tokens a step costs 6 + 2 per token, above it 37 + 0.84 per token (the CPU
    engine's int4 -> fp32 switch): two rows, split at 16, fit exactly; one smooth cost is
    left as one row."""

    def cost(batch: int, length: int) -> float:  # sum(len) and sum(len**2) of the batch
        tokens = batch * length
        return 6 + 2 * tokens if tokens <= 16 else 37 + 0.84 * tokens + 0.0004 * batch * length**2

    grid = [(1, 4), (1, 8), (1, 16), (1, 24), (1, 32), (2, 64), (1, 256), (4, 128)]
    points = [Point(b, n, cost(b, n)) for b, n in grid]
    small, large, threshold = fit_prefill(points)
    assert threshold == 16 and large is not None
    assert [round(x, 6) for x in small] == [6.0, 2.0, 0.0]
    assert [round(x, 6) for x in large] == [37.0, 0.84, 0.0004]
    smooth = [Point(p.batch, p.length, 20 + 0.9 * p.batch * p.length) for p in points]
    one, none, no_split = fit_prefill(smooth)
    assert none is None and no_split == NO_SPLIT and [round(x, 6) for x in one] == [20.0, 0.9, 0.0]


def test_fit_prefill_splits_where_it_pays_even_beside_a_point_no_row_fits():
    """The same two regimes plus one attention-heavy step 30% slower than either row can
    predict: two rows still cut the typical (root mean square) error, so the split at 16 is
    kept although the worst error stays about the same."""

    def cost(batch: int, length: int) -> float:
        tokens = batch * length
        return 6 + 2 * tokens if tokens <= 16 else 37 + 0.84 * tokens + 0.0004 * batch * length**2

    grid = [(1, 4), (1, 8), (1, 16), (1, 24), (1, 32), (2, 64), (1, 256), (4, 128), (2, 512)]
    points = [Point(b, n, cost(b, n)) for b, n in grid] + [Point(4, 1024, 1.3 * cost(4, 1024))]
    small, large, threshold = fit_prefill(points)
    assert threshold == 16 and large is not None
    assert [round(x, 6) for x in small] == [6.0, 2.0, 0.0]


def test_a_profile_with_two_prefill_rows_charges_each_side_and_round_trips():
    p = Profile(
        prefill=(6.0, 2.0, 0.0),
        prefill_large=(37.0, 0.84, 0.0),
        prefill_threshold=16,
        decode_small=(7.0, 0.002, 1.0),
        decode_large=(7.0, 0.002, 1.0),
    )
    assert step_ms(p, BatchShape(((16, 0),))) == 6 + 2 * 16
    assert step_ms(p, BatchShape(((17, 0),))) == 37 + 0.84 * 17
    assert step_ms(p, BatchShape(((10, 0), (10, 0)))) == 37 + 0.84 * 20  # the step's tokens decide
    assert Profile.from_dict(p.to_dict()) == p


def test_quick_profile_of_the_tiny_model_loads_into_the_simulator(tiny_model_dir, tmp_path):
    out = tmp_path / "cpu.json"
    rc = main(
        [
            "profile",
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "4MiB",
            "--quick",
            "--repeats",
            "1",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["meta"]["prefill_points"]) == 4 and len(data["meta"]["decode_points"]) == 4
    profile = load_profile(str(out))
    # tiny config: 2 layers x 2 kv heads x head_dim 16 x K and V x 4 bytes
    assert profile.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert profile.weight_bytes is not None and profile.weight_bytes > 0
    assert all(ms > 0 for _, _, ms in data["meta"]["prefill_points"] + data["meta"]["decode_points"])
    assert len(data["meta"]["mixed_check"]) == 1  # a mixed prefill + decode step, measured and modelled
    assert len(profile.step_overhead) == 2 and min(profile.step_overhead) >= 0
    threshold = profile.large_batch_threshold
    assert threshold == NO_SPLIT or threshold in {b for b, _, _ in data["meta"]["decode_points"]}


def test_a_timed_prompt_step_follows_an_untimed_decode_step_and_frees_both(make_llm, monkeypatch) -> None:
    """Served, a prompt step follows decode steps in other weight formats: time_rows runs
    ``between`` (untimed) before each timed run of the batch, and gives back every block."""
    from bucketserve.sim.profile import time_rows

    engine = make_llm().engine
    ran: list[tuple[int, ...]] = []
    execute = engine.runner.execute

    def recording(batch):  # type: ignore[no-untyped-def]
        ran.append(tuple(batch.num_new_tokens))
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", recording)
    ms = time_rows(engine, [(20, False)], repeats=2, between=[(16, True)] * 3)
    assert ms > 0
    assert ran == [(1, 1, 1), (20,)] * 3  # the warm-up and two timed runs, each after the decode batch
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
