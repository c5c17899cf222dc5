"""The discrete-event simulator: the core's policies, unchanged, on simulated GPUs.

Requests arrive at their times; each instance runs one batch at a time, chosen by a
scheduler from ``bucketserve.core.policies`` and charged by the cost model. Aggregated
serving runs every request on one instance, or on one of several replicas: the least loaded,
or by length band (``router="length"``, ``core.replica_bands``, as the real cluster routes).
Disaggregated serving (``decode_instance`` set) prefills on prefill instances, then moves
each sequence's KV cache to a decode instance that has reserved room for its whole life;
the prefill instance keeps the KV until the transfer completes, as DistServe's pull does.
Each request ends as a ``bucketserve.metrics.RequestRecord``, as the bench writes them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.policies import make_scheduler
from bucketserve.core.replica_bands import LengthBands
from bucketserve.core.sequence import FinishReason, Sequence
from bucketserve.errors import DeadlineUnreachableError, InvalidRequestError
from bucketserve.metrics import RequestRecord
from bucketserve.sampling_params import SamplingParams
from bucketserve.sim.cost_model import OPT_13B_KV_BYTES_PER_TOKEN, CostModel, Profile, kv_transfer_s
from bucketserve.sim.events import EventKind, EventQueue
from bucketserve.sim.instance import Instance, InstanceStats


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds
    prompt_len: int
    output_len: int
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    priority: int = 0


@dataclass(frozen=True)
class InstanceSpec:
    """One instance's hardware: its latency profile, its KV pool and the GPUs it uses."""

    profile: Profile
    kv_capacity_tokens: int
    num_gpus: int = 1


@dataclass
class SimConfig:
    scheduler: SchedulerConfig
    instance: InstanceSpec  # aggregated replicas, or the prefill instances when disaggregated
    num_instances: int = 1
    decode_instance: InstanceSpec | None = None  # set: disaggregated prefill/decode
    num_decode_instances: int = 1
    block_size: int = 16
    max_model_len: int = 4096
    kv_bytes_per_token: int = OPT_13B_KV_BYTES_PER_TOKEN
    link_bandwidth: float = 25e9  # bytes/s between a prefill and a decode instance
    link_latency: float = 0.0  # seconds every KV transfer takes on top (a CPU cluster's RPCs)
    router: str = "least-loaded"  # aggregated replicas: "least-loaded" or "length" (bands)
    # Disaggregated: the client sees the first token once the decode instance has the KV (our
    # server: the decode replica writes the whole reply), not when the prefill sampled it
    # (DistServe's prefill instance answers the first token itself).
    first_token_at_decode: bool = False
    pad_prefill: bool = False  # see CostModel.pad_prefill
    poll_s: float = 0.005  # an idle instance with queued work but no batch looks again after this
    # The machine's slowdown over the profile at each virtual time (None: none). Validation
    # replays the drift measured during a real run with it; see sim.validate.SpeedTrace.
    speed: Callable[[float], float] | None = None

    @property
    def disaggregated(self) -> bool:
        return self.decode_instance is not None

    @property
    def num_gpus(self) -> int:
        n = self.instance.num_gpus * self.num_instances
        if self.decode_instance is not None:
            n += self.decode_instance.num_gpus * self.num_decode_instances
        return n


@dataclass
class InstanceReport:
    name: str
    num_gpus: int
    stats: InstanceStats


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]  # in request order; rejected requests carry ``error``
    instances: list[InstanceReport]
    start: float  # first arrival
    end: float  # last completion
    num_gpus: int
    kv_transfers: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def busy_share(self) -> float:
        """GPU-seconds spent computing over GPU-seconds available, start to end."""
        if self.duration <= 0:
            return math.nan
        busy = sum(r.stats.busy_s * r.num_gpus for r in self.instances)
        return busy / (self.duration * self.num_gpus)

    @property
    def padding_ratio(self) -> float:
        real = sum(r.stats.real_tokens for r in self.instances)
        padded = sum(r.stats.padded_tokens for r in self.instances)
        return 1 - real / padded if padded else 0.0

    @property
    def steps(self) -> int:
        return sum(r.stats.steps for r in self.instances)

    @property
    def mean_step_s(self) -> float:
        return sum(r.stats.busy_s for r in self.instances) / self.steps if self.steps else math.nan

    @property
    def mean_schedule_wall_s(self) -> float:
        wall = sum(r.stats.schedule_wall_s for r in self.instances)
        return wall / self.steps if self.steps else math.nan


@dataclass
class _Transfer:
    seq: Sequence
    source: Instance
    blocks: list[int]
    target: Instance | None = None


@dataclass
class Simulator:
    config: SimConfig
    on_finish: Callable[[int], None] | None = None  # called with the count of newly finished requests
    _pending: deque[_Transfer] = field(default_factory=deque, init=False)

    def _build(self) -> tuple[list[Instance], list[Instance]]:
        cfg = self.config

        def make(name: str, spec: InstanceSpec) -> Instance:
            num_blocks = spec.kv_capacity_tokens // cfg.block_size
            sched = make_scheduler(cfg.scheduler, BlockManager(num_blocks, cfg.block_size), cfg.max_model_len)
            return Instance(name, sched, CostModel(spec.profile, cfg.pad_prefill), spec.num_gpus, cfg.speed)

        role = "prefill" if cfg.disaggregated else "instance"
        front = [make(f"{role}{i}", cfg.instance) for i in range(cfg.num_instances)]
        back = []
        if cfg.decode_instance is not None:
            back = [make(f"decode{i}", cfg.decode_instance) for i in range(cfg.num_decode_instances)]
        return front, back

    def run(self, requests: Seq[SimRequest]) -> SimResult:
        """Simulate ``requests`` to completion; deterministic for the same input."""
        cfg = self.config
        front, back = self._build()
        events = EventQueue()
        records: list[RequestRecord | None] = [None] * len(requests)
        index: dict[str, int] = {}
        transfers = 0
        self._pending.clear()
        bands = LengthBands(seats=cfg.scheduler.max_num_seqs) if cfg.router == "length" else None

        def done(seqs: list[Sequence]) -> None:
            for seq in seqs:
                i = index.pop(seq.seq_id)
                records[i] = RequestRecord(
                    arrival=seq.arrival_time,
                    first_token=seq.first_token_time if seq.first_token_time is not None else math.nan,
                    finished=seq.finished_time if seq.finished_time is not None else math.nan,
                    prompt_tokens=seq.prompt_len,
                    output_tokens=seq.num_output_tokens,
                    queue_time=(seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time,
                    # dropped from the queue as late (--reject-late): the server's 429
                    error="rejected: late in the queue" if seq.finish_reason is FinishReason.LATE else None,
                )
            if seqs and self.on_finish is not None:
                self.on_finish(len(seqs))

        to_kick: list[Instance] = []

        def mark(inst: Instance) -> None:
            # Instances look for work only once every event of this instant has been handled,
            # so that requests arriving together can be batched together.
            if inst not in to_kick:
                to_kick.append(inst)

        def kick(inst: Instance, now: float) -> None:
            if inst.busy:
                return
            end = inst.start(now)
            if end is not None:
                events.push(end, EventKind.STEP_DONE, inst)
            elif inst.scheduler.num_waiting and not inst.wake_pending:
                inst.wake_pending = True
                events.push(now + cfg.poll_s, EventKind.WAKE, inst)

        def dispatch_transfers(now: float) -> None:
            # FCFS: the oldest handed-over sequence goes first, to the least loaded decode
            # instance with room for its whole life.
            while self._pending:
                t = self._pending[0]
                room = [d for d in back if d.scheduler.can_attach(t.seq)]
                if not room:
                    return
                self._pending.popleft()
                t.target = min(room, key=lambda d: d.scheduler.num_running)
                t.target.scheduler.reserve(t.seq)
                delay = kv_transfer_s(t.seq.num_computed_tokens, cfg.kv_bytes_per_token, cfg.link_bandwidth)
                delay += cfg.link_latency
                events.push(now + delay, EventKind.TRANSFER_DONE, t)

        for i, r in enumerate(requests):
            events.push(r.arrival, EventKind.ARRIVAL, i)

        while events:
            ev = events.pop()
            now = ev.time
            if ev.kind is EventKind.ARRIVAL:
                i = ev.data
                r = requests[i]
                seq = Sequence(
                    f"r{i}",
                    range(r.prompt_len),  # type: ignore[arg-type]  # lengths matter, not token ids
                    SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                    arrival_time=r.arrival,
                    priority=r.priority,
                    ttft_slo=r.ttft_slo,
                    tpot_slo=r.tpot_slo,
                )
                if bands is not None and len(front) > 1:
                    inst = front[bands.rank(seq.max_len, [x.load for x in front])[0][0]]
                    bands.observe(seq.max_len)
                else:
                    inst = min(front, key=lambda x: x.load)
                try:
                    if back:  # it must fit a decode instance too, or it would wait there forever
                        back[0].scheduler.check_admissible(seq)
                    inst.scheduler.add(seq)
                except (InvalidRequestError, DeadlineUnreachableError) as e:  # 400 / 429 (late)
                    records[i] = RequestRecord(
                        r.arrival, math.nan, math.nan, r.prompt_len, 0, error=f"rejected: {e}"
                    )
                else:
                    index[seq.seq_id] = i
                    mark(inst)
            elif ev.kind is EventKind.WAKE:
                inst = ev.data
                inst.wake_pending = False
                mark(inst)
            elif ev.kind is EventKind.STEP_DONE:
                inst = ev.data
                done(inst.finish(now))
                if back and inst in front:
                    # Prefilled sequences leave for a decode instance; their KV stays here
                    # until it has been copied.
                    for seq in [s for s in inst.scheduler.running if s.num_output_tokens >= 1]:
                        blocks = inst.scheduler.detach(seq)
                        self._pending.append(_Transfer(seq, inst, blocks))
                if back:
                    dispatch_transfers(now)
                mark(inst)
            elif ev.kind is EventKind.TRANSFER_DONE:
                t = ev.data
                transfers += 1
                t.source.scheduler.release_blocks(t.blocks)
                t.target.scheduler.attach(t.seq, now)
                if cfg.first_token_at_decode:
                    t.seq.first_token_time = now
                mark(t.target)
                mark(t.source)
                dispatch_transfers(now)
            if events.next_time() > now:
                for inst in to_kick:
                    kick(inst, now)
                to_kick.clear()

        assert not index, f"{len(index)} requests never finished"
        final = [r for r in records if r is not None]
        assert len(final) == len(requests)
        ends = [r.finished for r in final if r.ok]
        start = min((r.arrival for r in requests), default=0.0)
        return SimResult(
            policy=cfg.scheduler.policy,
            records=final,
            instances=[InstanceReport(x.name, x.num_gpus, x.stats) for x in front + back],
            start=start,
            end=max(ends, default=start),
            num_gpus=cfg.num_gpus,
            kv_transfers=transfers,
        )


def simulate(config: SimConfig, requests: Seq[SimRequest]) -> SimResult:
    return Simulator(config).run(requests)
