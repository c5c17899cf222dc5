"""Scheduling policies, each a Scheduler subclass, built by name."""

from __future__ import annotations

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.policies.bucket import BucketScheduler
from bucketserve.core.policies.continuous import ContinuousScheduler
from bucketserve.core.policies.distserve import DistServeScheduler
from bucketserve.core.policies.static import StaticScheduler, UELLMScheduler
from bucketserve.core.scheduler import Scheduler

POLICY_CLASSES: dict[str, type[Scheduler]] = {
    "bucket": BucketScheduler,
    "continuous": ContinuousScheduler,
    "static": StaticScheduler,
    "uellm": UELLMScheduler,
    "distserve": DistServeScheduler,
}


def make_scheduler(config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> Scheduler:
    return POLICY_CLASSES[config.policy](config, block_manager, max_model_len)


__all__ = ["POLICY_CLASSES", "make_scheduler"]
