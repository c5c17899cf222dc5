"""Prometheus metrics, named like vLLM's (``bucketserve:`` instead of ``vllm:``): the engine's
state read at scrape time, and per-request latencies observed as each request's outputs come."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bucketserve.engine.async_engine import EngineSnapshot
from bucketserve.metrics import RequestRecord, meets_slo
from bucketserve.outputs import RequestOutput

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """Engine state, read from the engine's latest snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self.snapshot = snapshot
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        labels = ["model_name"]
        value = [self.model_name]
        for name, doc, v in (
            ("bucketserve:num_requests_running", "Requests in the running batch.", s.num_running),
            ("bucketserve:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("bucketserve:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", s.kv_cache_usage),
            ("bucketserve:padding_ratio", "Share of computed tokens that were padding.", s.padding_ratio),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            yield g
        c = CounterMetricFamily(
            "bucketserve:num_preemptions", "Preemptions (recompute) since start.", labels=labels
        )
        c.add_metric(value, s.num_preemptions)
        yield c
        c = CounterMetricFamily(
            "bucketserve:num_requests_late",
            "Requests that could not meet their TTFT target (by the online cost model): on arrival, "
            "behind the prompts ahead, and with --reject-late queued prompts dropped once late.",
            labels=labels,
        )
        c.add_metric(value, s.num_late)
        yield c
        c = CounterMetricFamily(
            "bucketserve:num_late_demotions",
            "Prompts the bucket policy moved behind the ones still on time once they could no longer "
            "meet their TTFT target (--bucket-late-demotion).",
            labels=labels,
        )
        c.add_metric(value, s.num_late_demotions)
        yield c
        c = CounterMetricFamily("bucketserve:engine_steps", "Engine steps since start.", labels=labels)
        c.add_metric(value, s.num_steps)
        yield c
        g = GaugeMetricFamily(
            "bucketserve:num_buckets", "Waiting queues: buckets for --policy bucket, else 1.", labels=labels
        )
        g.add_metric(value, len(s.queues))
        yield g
        g = GaugeMetricFamily(
            "bucketserve:bucket_queue_length",
            "Waiting requests per bucket (its prompt-length range [lower,upper)).",
            labels=[*labels, "bucket"],
        )
        for bucket, n in s.queues:
            g.add_metric([*value, bucket], n)
        yield g


@dataclass(frozen=True)
class FinishedRequest:
    """One finished request as the web page's latency charts read it: its record (the
    bench's and the simulator's definitions) and the targets it was scheduled against."""

    record: RequestRecord
    ttft_slo: float | None
    tpot_slo: float | None

    @property
    def met_slo(self) -> bool:
        return meets_slo(self.record, self.ttft_slo, self.tpot_slo)


class ServerMetrics:
    """Per-request metrics, observed by the HTTP handlers; one registry per app.

    Beside the Prometheus series, plain tallies and the last finished requests are kept for
    the web page (``dashboard``), which reads them without parsing its own exposition."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(
                f"bucketserve:{name}", doc, ["model_name"], registry=self.registry, buckets=buckets
            )

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"bucketserve:{name}", doc, ["model_name", *labels], registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, from arrival.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency, from arrival to the last token.",
            E2E_BUCKETS,
        )  # fmt: skip
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first being scheduled.", E2E_BUCKETS
        )
        self.kv_transfer = histogram(
            "kv_transfer_seconds",
            "Disaggregated serving: from a prefill replica's hand-over to the KV written into the "
            "decode replica that serves the request (serialization, transfer, copy).",
        )
        self.success = counter("request_success", "Finished requests, by finish reason.", "finished_reason")
        self.rejected = counter(
            "request_rejected",
            "Requests refused before running, by reason (invalid, queue_full, unauthorized, shutdown).",
            "reason",
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.registry.register(_EngineCollector(snapshot, model_name))
        self.num_generated_tokens = 0
        self.rejections: Tally[str] = Tally()
        self.finished: deque[FinishedRequest] = deque(maxlen=8192)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()
        self.rejections[reason] += 1


class RequestTracker:
    """Observes one request's outputs, as they come, into the server's metrics: TTFT and
    queue time at its first token, the gaps between later tokens (spread evenly over the
    tokens one output brought), E2E latency and its finish reason at the end."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.num_tokens = 0
        self.last: float | None = None  # when the previous output brought tokens

    def observe(self, out: RequestOutput) -> None:
        m, label = self.metrics, self.metrics.model_name
        now = time.monotonic()
        n = len(out.outputs[0].token_ids)
        new = n - self.num_tokens
        if new > 0:
            t = out.metrics
            if self.num_tokens == 0 and t.first_token_time is not None:
                m.ttft.labels(label).observe(max(0.0, t.first_token_time - t.arrival_time))
                if t.kv_transfer_time is not None:
                    m.kv_transfer.labels(label).observe(t.kv_transfer_time)
                if t.first_scheduled_time is not None:
                    m.queue_time.labels(label).observe(max(0.0, t.first_scheduled_time - t.arrival_time))
            elif self.last is not None:
                gap = (now - self.last) / new
                for _ in range(new):
                    m.itl.labels(label).observe(gap)
            m.generation_tokens.labels(label).inc(new)
            m.num_generated_tokens += new
            self.num_tokens, self.last = n, now
        if out.finished:
            end = out.metrics.finished_time or now
            m.e2e.labels(label).observe(max(0.0, end - out.metrics.arrival_time))
            m.success.labels(label, out.outputs[0].finish_reason or "unknown").inc()
            m.prompt_tokens.labels(label).inc(len(out.prompt_token_ids))
            completed = out.outputs[0].finish_reason in ("stop", "length")
            if (
                completed
                and out.metrics.first_token_time is not None
                and out.metrics.finished_time is not None
            ):
                record = RequestRecord.from_output(out)
                m.finished.append(FinishedRequest(record, out.metrics.ttft_slo, out.metrics.tpot_slo))

    def aborted(self) -> None:
        self.metrics.success.labels(self.metrics.model_name, "abort").inc()
