"""Scheduling policies, one module each, registered by name (see ``registry``).

Importing this package registers every policy, in the order ``--policy`` lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The order of registration is the order every list of policies shows.
# isort: off
from bucketserve.core.policies import bucket, continuous, static, uellm, distserve  # noqa: F401

# isort: on
from bucketserve.core.policies.registry import Policy, all_policies, get_policy, policy_names

if TYPE_CHECKING:
    from bucketserve.config import SchedulerConfig
    from bucketserve.core.block_manager import BlockManager
    from bucketserve.core.scheduler import Scheduler


def make_scheduler(config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> Scheduler:
    return get_policy(config.policy).scheduler(config, block_manager, max_model_len)


__all__ = ["Policy", "all_policies", "get_policy", "make_scheduler", "policy_names"]
