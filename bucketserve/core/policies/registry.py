"""The policy registry: every scheduling policy by name, with its scheduler class and options.

Each policy module registers itself when imported (``bucketserve.core.policies`` imports
them all, in the order the command line lists them). Everything that lists, checks or builds
policies reads this registry: the config's validation, the command line's ``--policy`` and
its per-policy options, the simulator, the bench and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bucketserve.errors import ConfigError

if TYPE_CHECKING:
    from bucketserve.core.scheduler import Scheduler


@dataclass(frozen=True)
class Policy:
    name: str  # what --policy and SchedulerConfig.policy say
    scheduler: type[Scheduler]
    config: type[Any]  # the dataclass of the policy's own options (SchedulerConfig.policy_config)
    summary: str  # one line for --policy's help


_POLICIES: dict[str, Policy] = {}


def register_policy(name: str, scheduler: type[Scheduler], config: type[Any], summary: str) -> None:
    if name in _POLICIES:
        raise ValueError(f"policy {name!r} is registered twice")
    _POLICIES[name] = Policy(name, scheduler, config, summary)


def get_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(_POLICIES)}") from None


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def all_policies() -> tuple[Policy, ...]:
    return tuple(_POLICIES.values())
