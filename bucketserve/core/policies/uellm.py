"""UELLM (He et al., ICSOC 2024): SLO-ODBS batching, then each group runs as a static batch.

The constants are those of UELLM's released code (HYIUYOU/UELLM, ``SLO_ODBS.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.core.ordering import job_tokens, targets
from bucketserve.core.policies.registry import register_policy
from bucketserve.core.policies.static import StaticScheduler
from bucketserve.core.sequence import Sequence
from bucketserve.options import check, check_fields, option


@dataclass
class UELLMConfig:
    """UELLM's SLO_ODBS batching, with the constants of its released code (HYIUYOU/UELLM)."""

    a: float = option(1.0, help="weight of the SLO (seconds) in the sort key")
    b: float = option(0.5, help="weight of the predicted output length (tokens) in the sort key")
    batch_cap: int = option(10, help="most requests per batch")
    threshold: float = option(
        15000.0, help="grouping threshold: (out - current_max) x (len + 1) x 1.2 must stay under it"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.batch_cap >= 1, f"uellm batch_cap must be >= 1, got {self.batch_cap}")
        check(self.threshold > 0, f"uellm threshold must be > 0, got {self.threshold}")


class UELLMScheduler(StaticScheduler):
    """UELLM's SLO-ODBS: sort by a x SLO + b x predicted output, then group greedily while the
    group is under the cap and (out - current_max) x (size + 1) x 1.2 <= threshold."""

    def form_batch(self) -> list[Sequence]:
        cfg: UELLMConfig = self.config.policy_config
        order = self.config.order

        def predicted(s: Sequence) -> int:
            return job_tokens(s) - s.prompt_len

        def key(s: Sequence) -> float:
            return cfg.a * targets(s, order)[0] + cfg.b * predicted(s)

        candidates = sorted(self.waiting, key=key)
        group = candidates[:1]
        current_max = predicted(group[0])
        for seq in candidates[1:]:
            out = predicted(seq)
            if len(group) >= cfg.batch_cap or (out - current_max) * (len(group) + 1) * 1.2 > cfg.threshold:
                break
            group.append(seq)
            current_max = max(current_max, out)
        return group


register_policy(
    "uellm",
    UELLMScheduler,
    UELLMConfig,
    "UELLM's SLO-ODBS groups (by SLO and predicted output), each run as a static batch",
)
