"""Urgency keys: who goes first among waiting requests."""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.core.sequence import Sequence
from bucketserve.errors import ConfigError
from bucketserve.options import check, check_fields, option

ORDERS = ("fcfs", "sjf", "ljf", "edf", "edfs")


@dataclass
class OrderConfig:
    """Who goes first among waiting requests (every policy that orders uses this).

    Each request gets a fixed urgency key, in seconds; the lowest runs first:

        key = arrival + priority * aging_s            (fcfs)
            + the request's TTFT target T             (edf; see ``targets``)
            + T + max(0, T - T0) * job tokens * deadline_token_share   (edfs)
            + predicted job tokens * token_weight_s   (sjf; minus for ljf)

    edfs is EDF with a size term for the requests whose target T is looser than the tightest
    target the configuration knows, T0 (its classes and default): the tightest class keeps
    plain deadline order (among equal deadlines any reordering costs deadlines near capacity:
    sizing the chats too lost load on ShareGPT), while a long document with a loose target
    moves back by seconds, behind the chats that arrive meanwhile and behind shorter
    documents, so under overload the queue gives up the largest jobs first (docs/RESULTS.md,
    issue 13, thirty-first session; the default since the thirty-second, where it held more
    load than edf on the Azure trace and ShareGPT, and less on chats and documents by less
    than that workload's capacity moves between commands).
    With one target for all it is edf, and so it is for targets the requests bring themselves
    (``ttft_slo_ms``) within the tightest configured one: T0 is what the configuration knows,
    fixed, so that a key does not depend on which requests were present at its arrival.

    Because the key never changes after arrival, aging is built in: a request is overtaken
    only by requests that arrive less than (its key - their key offset) later, so no request
    waits forever. Priorities are integers, lower first, as in vLLM.
    """

    order: str = option(
        "edfs",
        choices=ORDERS,
        help="who goes first: fcfs, sjf/ljf (shortest/longest job), edf (earliest TTFT deadline), "
        "edfs (edf, and a request with a looser TTFT target than the tightest configured one "
        "later by its size: --deadline-token-share)",
    )
    aging_s: float = option(
        1.0,
        name="aging",
        metavar="SECONDS",
        help="one priority level is worth this much waiting (bounds every wait)",
    )
    token_weight_s: float = option(
        0.001,
        name="token-weight",
        metavar="SECONDS",
        help="sjf/ljf: one token of job size is worth this much waiting",
    )
    deadline_token_share: float = option(
        0.0006,
        metavar="SHARE",
        help="edfs: one token of job size (prompt + predicted or maximum output) moves a "
        "request's key later by this share of how much looser its TTFT target is than the "
        "tightest class or default (targets 1 s and 5 s: a 1,500-token document by 3.6 s)",
    )
    default_ttft_slo_s: float = option(
        10.0,
        name="default-ttft-slo",
        metavar="SECONDS",
        help="the TTFT target of requests without their own ttft_slo_ms or a length class",
    )
    default_tpot_slo_s: float | None = option(
        None,
        name="default-tpot-slo",
        metavar="SECONDS",
        help="the TPOT target of requests without their own tpot_slo_ms or a length class (default: none)",
    )
    slo_classes: tuple[str, ...] = option(
        (),
        name="slo-classes",
        metavar="LEN:TTFT:TPOT,...",
        help="default targets by prompt length, in seconds: a request of at most LEN prompt tokens "
        "takes the first class that holds it, e.g. 256:1:0.1,2048:4:0.15 (TPOT may be -, none); "
        "a request's own ttft_slo_ms / tpot_slo_ms come first",
    )
    reject_late: bool = option(
        False,
        help="answer 429 at once to a request that cannot meet its TTFT target however fast the "
        "steps go: the prompts the order runs before it and its own, in full-budget steps, end "
        "after its deadline (by the online cost model; such requests are counted either way); "
        "and end with a 429 (an error event if streaming) a request still without its first token "
        "once it could no longer meet its target, instead of running it late",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.aging_s >= 0, f"aging_s must be >= 0, got {self.aging_s}")
        check(self.token_weight_s >= 0, f"token_weight_s must be >= 0, got {self.token_weight_s}")
        check(
            self.deadline_token_share >= 0,
            f"deadline_token_share must be >= 0, got {self.deadline_token_share}",
        )
        check(self.default_ttft_slo_s > 0, f"default_ttft_slo_s must be > 0, got {self.default_ttft_slo_s}")
        check(
            self.default_tpot_slo_s is None or self.default_tpot_slo_s > 0,
            f"default_tpot_slo_s must be > 0, got {self.default_tpot_slo_s}",
        )
        self.classes = parse_slo_classes(self.slo_classes)
        # The tightest TTFT target the configuration knows (its classes and default): T0 of
        # edfs, and the bucket policy's step cap before requests bring their own.
        self.tightest_ttft_s = min([self.default_ttft_slo_s, *(c.ttft_s for c in self.classes)])


@dataclass(frozen=True)
class SloClass:
    """Default targets (seconds) for requests of at most ``max_prompt`` prompt tokens."""

    max_prompt: int
    ttft_s: float
    tpot_s: float | None


def parse_slo_classes(specs: tuple[str, ...]) -> tuple[SloClass, ...]:
    """``("256:1:0.1", "2048:4:-")`` -> SloClasses sorted by length; one-line errors."""
    classes = []
    for spec in specs:
        parts = spec.split(":")
        check(len(parts) == 3, f"an SLO class is LEN:TTFT:TPOT (seconds), e.g. 256:1:0.1; got {spec!r}")
        try:
            length, ttft = int(parts[0]), float(parts[1])
            tpot = None if parts[2].strip() in ("-", "none", "") else float(parts[2])
        except ValueError:
            raise ConfigError(
                f"cannot read the SLO class {spec!r}: LEN is an integer, TTFT and TPOT numbers"
            ) from None
        positive = length > 0 and ttft > 0 and (tpot is None or tpot > 0)
        check(positive, f"SLO class {spec!r}: every value must be > 0")
        classes.append(SloClass(length, ttft, tpot))
    lengths = [c.max_prompt for c in classes]
    check(len(set(lengths)) == len(lengths), f"SLO classes repeat a length: {', '.join(specs)}")
    return tuple(sorted(classes, key=lambda c: c.max_prompt))


def targets(seq: Sequence, cfg: OrderConfig) -> tuple[float, float | None]:
    """(TTFT target, TPOT target or None), seconds: the request's own, else the first length
    class that holds its prompt, else the defaults."""
    ttft, tpot = cfg.default_ttft_slo_s, cfg.default_tpot_slo_s
    for c in cfg.classes:
        if seq.prompt_len <= c.max_prompt:
            ttft, tpot = c.ttft_s, c.tpot_s
            break
    return (
        seq.ttft_slo if seq.ttft_slo is not None else ttft,
        seq.tpot_slo if seq.tpot_slo is not None else tpot,
    )


def job_tokens(seq: Sequence) -> int:
    """The work a request asks for: its prompt plus its predicted (or maximum) output."""
    out = seq.predicted_output_len if seq.predicted_output_len is not None else seq.params.max_tokens
    return seq.prompt_len + out


def urgency(seq: Sequence, cfg: OrderConfig) -> float:
    """A key in seconds, fixed at arrival; lower runs first. Aging is built in (see OrderConfig)."""
    key = seq.arrival_time + seq.priority * cfg.aging_s
    if cfg.order == "edf":
        key += targets(seq, cfg)[0]
    elif cfg.order == "edfs":
        ttft = targets(seq, cfg)[0]
        key += ttft + max(0.0, ttft - cfg.tightest_ttft_s) * job_tokens(seq) * cfg.deadline_token_share
    elif cfg.order == "sjf":
        key += job_tokens(seq) * cfg.token_weight_s
    elif cfg.order == "ljf":
        key -= job_tokens(seq) * cfg.token_weight_s
    return key
