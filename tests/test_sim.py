"""The simulator: exact virtual-time results on hand-computable scenarios, the core's
policies used unchanged, determinism, and the cost model's formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bucketserve.config import SchedulerConfig, StaticConfig
from bucketserve.core.policies import all_policies
from bucketserve.core.scheduler import BatchShape, ScheduledBatch
from bucketserve.core.sequence import Sequence
from bucketserve.metrics import summarize
from bucketserve.sampling_params import SamplingParams
from bucketserve.sim import simulator as sim_module
from bucketserve.sim.cost_model import (
    OPT_13B_KV_BYTES_PER_TOKEN,
    OPT_13B_WEIGHT_BYTES,
    CostModel,
    Profile,
    kv_capacity_tokens,
    kv_transfer_s,
    load_profile,
)
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, Simulator, simulate
from tests.core_helpers import seq

# Linear costs in ms: prefill 10 + 1 per token; decode 5 per step whatever the batch.
LINEAR = Profile(prefill=(10.0, 1.0, 0.0), decode_small=(5.0, 0.0, 0.0), decode_large=(5.0, 0.0, 0.0))


def config(policy: str, **kw: object) -> SimConfig:
    return SimConfig(
        SchedulerConfig(policy=policy, **kw), InstanceSpec(LINEAR, 4096), block_size=4, max_model_len=256
    )


def by_arrival(result: sim_module.SimResult) -> list[tuple[float, float]]:
    return [(round(r.ttft, 9), round(r.e2e, 9)) for r in result.records]


def test_continuous_two_requests_exact_ttft_and_e2e():
    # A (10 prompt, 3 out) prefills alone: 10 + 10 = 20 ms -> first token at 20 ms.
    # B (4 prompt, 2 out) arrives at 5 ms, joins A's decode at 20 ms: a mixed step costs
    # prefill 10 + 4 plus decode 5 without its fixed 5 = 14 ms -> B's first token at 34 ms.
    # At 34 ms both decode (5 ms): A's third and B's second token at 39 ms.
    result = simulate(config("continuous"), [SimRequest(0.0, 10, 3), SimRequest(0.005, 4, 2)])
    assert by_arrival(result) == [(0.020, 0.039), (0.029, 0.034)]
    assert result.duration == pytest.approx(0.039)


def test_static_padded_batch_with_ghost_row_exact_times():
    # Both prompts padded to 10: prefill 10 + 2 x 10 = 30 ms. Decodes cost 5 ms each; A (2 out)
    # finishes at 35 ms, B (3 out) runs one more step with A as a ghost row: 40 ms.
    cfg = config("static", policy_config=StaticConfig(batch_size=8))
    result = simulate(cfg, [SimRequest(0.0, 10, 2), SimRequest(0.0, 4, 3)])
    assert by_arrival(result) == [(0.030, 0.035), (0.030, 0.040)]
    assert result.padding_ratio == pytest.approx(1 - (14 + 2 + 1) / (20 + 2 + 2))


def test_disaggregated_distserve_counts_the_kv_transfer():
    # Prefill 10 + 10 = 20 ms on the prefill instance; 10 tokens x 1000 bytes over 1 MB/s take
    # 10 ms; one decode step of 5 ms on the decode instance: done at 35 ms.
    cfg = SimConfig(
        SchedulerConfig(policy="distserve"),
        InstanceSpec(LINEAR, 1024),
        decode_instance=InstanceSpec(LINEAR, 1024),
        block_size=4,
        max_model_len=256,
        kv_bytes_per_token=1000,
        link_bandwidth=1e6,
    )
    result = simulate(cfg, [SimRequest(0.0, 10, 2)])
    assert by_arrival(result) == [(0.020, 0.035)]
    assert result.kv_transfers == 1
    prefill, decode = result.instances
    assert (prefill.stats.steps, decode.stats.steps) == (1, 1)


def test_disaggregated_transfer_waits_for_decode_memory():
    # The decode pool (32 tokens) holds one request's whole life (10 + 6 = 16 -> 16 tokens
    # in blocks of 4) twice at most; the third waits until one finishes, never over-admitted.
    cfg = SimConfig(
        SchedulerConfig(policy="distserve"),
        InstanceSpec(LINEAR, 1024),
        decode_instance=InstanceSpec(LINEAR, 32),
        block_size=4,
        max_model_len=32,
        kv_bytes_per_token=1,
        link_bandwidth=1e9,
    )
    result = simulate(cfg, [SimRequest(0.0, 10, 6)] * 3)
    assert all(r.ok for r in result.records)
    finishes = sorted(r.finished for r in result.records)
    assert finishes[2] > finishes[0] + 0.005 * 4  # the third started decoding after one ended


def test_every_policy_finishes_every_request_and_uses_the_core_classes(monkeypatch):
    used = []
    real = sim_module.make_scheduler

    def spy(cfg, bm, max_len):
        s = real(cfg, bm, max_len)
        used.append(type(s))
        return s

    monkeypatch.setattr(sim_module, "make_scheduler", spy)
    requests = [SimRequest(0.01 * i, 5 + 7 * i % 60, 1 + i % 9) for i in range(40)]
    for policy in all_policies():
        result = simulate(config(policy.name, max_num_seqs=8), requests)
        assert [r.prompt_tokens for r in result.records] == [r.prompt_len for r in requests]
        assert [r.output_tokens for r in result.records] == [r.output_len for r in requests]
        assert all(r.first_token >= r.arrival and r.finished >= r.first_token for r in result.records)
    assert used == [policy.scheduler for policy in all_policies()]


def test_a_request_that_can_never_fit_is_rejected_not_run():
    result = simulate(config("bucket"), [SimRequest(0.0, 300, 4), SimRequest(0.0, 5, 2)])
    assert result.records[0].error is not None and result.records[0].error.startswith("rejected")
    assert result.records[1].ok


def test_seeded_runs_are_deterministic():
    requests = [SimRequest(0.003 * i, 3 + (17 * i) % 90, 1 + (5 * i) % 20) for i in range(200)]
    for policy in ("bucket", "uellm"):
        a = simulate(config(policy), requests)
        b = Simulator(config(policy)).run(requests)
        assert [(r.first_token, r.finished) for r in a.records] == [
            (r.first_token, r.finished) for r in b.records
        ]


def test_records_feed_the_shared_metrics_module():
    result = simulate(config("continuous"), [SimRequest(0.0, 10, 3), SimRequest(0.005, 4, 2)])
    summary = summarize(result.records, result.duration)
    assert summary["completed"] == 2
    assert summary["output_throughput"] == pytest.approx(5 / 0.039)


# -- the cost model ----------------------------------------------------------------------
def test_published_profile_loads_opt13b_coefficients():
    profile = load_profile("a100-distserve", tp=2)
    assert profile.prefill[0] == pytest.approx(13.402703359246601)
    assert profile.large_batch_threshold == 95
    with pytest.raises(ValueError):
        load_profile("a100-distserve", tp=3)


def test_ragged_and_padded_prefill_costs():
    p = Profile(
        prefill=(1.0, 0.1, 0.01),
        decode_small=(2.0, 0.001, 0.5),
        decode_large=(0, 0, 0),
        large_batch_threshold=99,
    )
    a, b = seq(0, 10, 4), seq(1, 30, 4)
    ragged = ScheduledBatch([a, b], [10, 30])
    padded = ScheduledBatch([a, b], [10, 30], padded=True)
    assert CostModel(p).step_time(ragged) == pytest.approx((1 + 0.1 * 40 + 0.01 * (100 + 900)) / 1e3)
    assert CostModel(p).step_time(padded) == pytest.approx((1 + 0.1 * 60 + 0.01 * 1800) / 1e3)


def test_decode_cost_switches_rows_at_the_large_batch_threshold():
    p = Profile(
        prefill=(0, 0, 0),
        decode_small=(2.0, 0.0, 1.0),
        decode_large=(100.0, 0.0, 0.0),
        large_batch_threshold=3,
    )
    seqs = [seq(i, 5, 4) for i in range(3)]
    for s in seqs:
        s.num_computed_tokens = 4
    assert CostModel(p).step_time(ScheduledBatch(seqs[:2], [1, 1])) == pytest.approx(0.004)
    assert CostModel(p).step_time(ScheduledBatch(seqs, [1, 1, 1])) == pytest.approx(0.1)


def test_kv_capacity_is_memory_minus_weights():
    # 4 x A100-40GB at 90%: 144 GB - 26 GB of fp16 weights, 819,200 bytes per OPT-13B token.
    assert kv_capacity_tokens(40e9, 4, OPT_13B_WEIGHT_BYTES, OPT_13B_KV_BYTES_PER_TOKEN) == 144_042
    with pytest.raises(ValueError):
        kv_capacity_tokens(40e9, 1, 40e9, 1)
    assert kv_transfer_s(1000, OPT_13B_KV_BYTES_PER_TOKEN, 25e9) == pytest.approx(0.032768)
    assert math.isclose(kv_transfer_s(0, 1, 1.0), 0.0)


def test_requests_arriving_together_are_batched_together():
    # Offline: both at t=0 form one prefill step (10 + 14 = 24 ms), not two.
    result = simulate(config("continuous"), [SimRequest(0.0, 10, 1), SimRequest(0.0, 4, 1)])
    assert by_arrival(result) == [(0.024, 0.024), (0.024, 0.024)]


def test_a_rejected_last_arrival_does_not_stall_the_others():
    result = simulate(config("continuous"), [SimRequest(0.0, 10, 1), SimRequest(0.0, 999, 1)])
    assert result.records[0].finished == pytest.approx(0.020)


def test_core_detach_and_attach_move_a_sequence_between_schedulers():
    from tests.core_helpers import make

    prefill, decode = make("distserve"), make("distserve")
    s = seq(0, 10, 6)
    prefill.add(s)
    batch = prefill.schedule(0.0)
    prefill.update(batch, [7], 0.1)
    blocks = prefill.detach(s)
    assert s.seq_id not in prefill.seqs and not prefill.running and s.block_table == []
    assert prefill.block_manager.num_used_blocks == len(blocks) == 3  # held until copied
    assert decode.can_attach(s)
    decode.reserve(s)
    prefill.release_blocks(blocks)
    decode.attach(s, 0.2)
    assert prefill.block_manager.num_used_blocks == 0
    assert decode.block_manager.num_used_blocks == 4  # 10 + 6 tokens in blocks of 4
    assert decode.schedule(0.2).num_new_tokens == [1]


def test_pad_prefill_charges_a_ragged_batch_as_padded_and_counts_the_padding():
    p = Profile(prefill=(1.0, 0.1, 0.01), decode_small=(2.0, 0.0, 0.0), decode_large=(2.0, 0.0, 0.0))
    batch = ScheduledBatch([seq(0, 10, 4), seq(1, 30, 4)], [10, 30])
    padded = CostModel(p, pad_prefill=True)
    assert padded.step_time(batch) == pytest.approx((1 + 0.1 * 60 + 0.01 * 1800) / 1e3)
    assert (padded.computed_tokens(batch), CostModel(p).computed_tokens(batch)) == (60, 40)


def test_a_profiles_step_overhead_is_added_per_step_and_per_row():
    p = Profile(
        prefill=(0, 0, 0),
        decode_small=(2.0, 0.0, 0.0),
        decode_large=(2.0, 0.0, 0.0),
        step_overhead=(1.0, 0.5),
    )
    seqs = [seq(i, 5, 4) for i in range(4)]
    for s in seqs:
        s.num_computed_tokens = 4
    assert CostModel(p).step_time(ScheduledBatch(seqs, [1] * 4)) == pytest.approx((2.0 + 1.0 + 0.5 * 4) / 1e3)


def test_disaggregated_rejects_what_the_decode_instance_could_never_hold():
    cfg = SimConfig(
        SchedulerConfig(policy="distserve"),
        InstanceSpec(LINEAR, 1024),
        decode_instance=InstanceSpec(LINEAR, 16),
        block_size=4,
        max_model_len=256,
    )
    result = simulate(cfg, [SimRequest(0.0, 10, 20), SimRequest(0.0, 10, 2)])
    assert result.records[0].error is not None and result.records[1].ok


def test_a_measured_mixed_scale_multiplies_only_mixed_steps():
    import dataclasses

    from bucketserve.sim.profile import mixed_scale

    scaled = dataclasses.replace(LINEAR, mixed_scale=1.5)
    decoding = seq(0, 5, 4)
    decoding.num_computed_tokens = 5
    prefill, mixed = ScheduledBatch([seq(1, 8, 4)], [8]), ScheduledBatch([decoding, seq(2, 8, 4)], [1, 8])
    # mixed: prefill (10 + 8) + decode without its fixed part (5 - 5) = 18 ms, times 1.5
    assert CostModel(scaled).step_time(mixed) == pytest.approx(27.0 / 1e3)
    assert CostModel(scaled).step_time(prefill) == CostModel(LINEAR).step_time(prefill)
    assert (
        mixed_scale([[1, 64, 16, 256, 120.0, 100.0], [2, 64, 8, 128, 130.0, 100.0], [1, 8, 1, 8, 1.0, 1.0]])
        == 1.2
    )
    assert mixed_scale([]) == 1.0


def test_a_machine_at_half_speed_doubles_every_step():
    # The two-request scenario above with every step taking twice as long: A's first token
    # at 40 ms, B's (arrived at 5 ms) at 40 + 28 = 68 ms, both done at 68 + 10 = 78 ms.
    cfg = config("continuous")
    cfg.speed = lambda t: 2.0
    result = simulate(cfg, [SimRequest(0.0, 10, 3), SimRequest(0.005, 4, 2)])
    assert by_arrival(result) == [(0.040, 0.078), (0.063, 0.073)]


def test_a_batch_shape_holds_chunks_after_their_cache_and_decode_contexts():
    a = Sequence("a", list(range(10)), SamplingParams(max_tokens=4))
    b = Sequence("b", list(range(6)), SamplingParams(max_tokens=4))
    a.num_computed_tokens = 4  # a chunk of 6 after 4 cached tokens
    b.num_computed_tokens = 5  # one decode token after a context of 6
    shape = ScheduledBatch([a, b], [6, 1]).shape()
    assert (shape.prefill, shape.decode, shape.num_rows) == (((6, 4),), (6,), 2)
    # The cost model charges the shape: prefill 10 + 6 (its c, on the chunk's attention over
    # the cache, is 0 here), plus the decode row without the step's second fixed 5 ms.
    assert CostModel(LINEAR).shape_time(shape) == pytest.approx((10 + 6) / 1e3)


def test_a_static_batch_decodes_padded_on_a_dense_cache_and_unpadded_on_our_paged_one():
    # Decode rows at contexts 10 and 30 plus one ghost row; decode costs 1 ms per context token.
    shape = BatchShape(decode=(10, 30), padded=True, num_ghost_rows=1)
    dense = Profile(prefill=(0, 0, 0), decode_small=(0, 1.0, 0), decode_large=(0, 1.0, 0))
    paged = dataclasses.replace(dense, padded_decode=False)
    assert CostModel(dense).shape_time(shape) == pytest.approx(3 * 30 / 1e3)  # every row at the longest
    assert CostModel(paged).shape_time(shape) == pytest.approx((10 + 30 + 1) / 1e3)  # the ghost reads one


def test_replicas_routed_by_length_band_keep_short_and_long_requests_apart() -> None:
    requests = [SimRequest(0.5 * i, 2000 if i % 2 else 10, 4) for i in range(20)]
    cfg = dataclasses.replace(config("bucket"), num_instances=2, router="length", max_model_len=4096)
    cfg = dataclasses.replace(cfg, instance=InstanceSpec(LINEAR, 65536))
    result = simulate(cfg, requests)
    tokens = sorted(r.stats.real_tokens for r in result.instances)
    assert tokens[0] == 10 * (10 + 4 - 1)  # the ten shorts' prompts and decode rows, nothing else
    assert tokens[1] >= 10 * 2000
    least = simulate(dataclasses.replace(cfg, router="least-loaded"), requests)
    assert min(r.stats.real_tokens for r in least.instances) > 2000  # each took some long prompts


def test_the_topologies_share_the_gpus_as_one_engine_two_replicas_or_prefill_and_decode() -> None:
    from bucketserve.sim.experiments import TOPOLOGIES, Setup, topology_config, topology_experiment

    setup = Setup(num_gpus=2, max_num_seqs=64)
    configs = {t: topology_config(setup, t) for t in TOPOLOGIES}
    assert all(c.num_gpus == 2 for c in configs.values())
    assert configs["one engine"].instance.num_gpus == 2
    assert configs["replicas, length bands"].router == "length"
    assert configs["prefill + decode"].disaggregated
    data = topology_experiment(setup, ["mixed"], [1.0], num_requests=40)
    row = data["runs"]["mixed"]["1.0"]
    assert set(row) == set(TOPOLOGIES) and all(r["completed"] == 40 for r in row.values())
    assert set(data["capacity"]["mixed"]) == set(TOPOLOGIES)
