"""One Prometheus exposition from several replicas' own: every sample gains a ``replica``
label, families of the same name are written once. Pure (prometheus_client only, no Ray)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Mapping[str, str], label: str = REPLICA_LABEL) -> str:
    """The families of every ``texts[replica]`` exposition, each sample labelled
    ``label="replica"``, in one exposition (replicas in sorted order)."""
    merged: dict[str, Metric] = {}
    for replica in sorted(texts):
        for family in text_string_to_metric_families(texts[replica]):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            into.samples += [s._replace(labels={**s.labels, label: replica}) for s in family.samples]
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry).decode()
