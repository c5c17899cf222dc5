"""Scheduling policies, each a Scheduler subclass, built by name."""

from __future__ import annotations

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.policies.continuous import ContinuousScheduler
from bucketserve.core.scheduler import Scheduler

_POLICIES: dict[str, type[Scheduler]] = {"continuous": ContinuousScheduler}


def make_scheduler(
    config: SchedulerConfig, block_manager: BlockManager, max_model_len: int
) -> Scheduler:
    return _POLICIES[config.policy](config, block_manager, max_model_len)


__all__ = ["ContinuousScheduler", "make_scheduler"]
