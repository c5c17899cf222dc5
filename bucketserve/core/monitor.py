"""The global monitor: load statistics that feed the batching controller and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Monitor:
    """Moving averages of arrivals and step latencies, and a histogram of prompt lengths.

    ``alpha`` is the weight of the newest sample in each exponential moving average.
    """

    max_len: int
    num_bins: int = 64
    alpha: float = 0.1
    arrival_rate: float = 0.0  # requests per second (EWMA of 1 / inter-arrival gap)
    step_latency: float = 0.0  # seconds (EWMA)
    prefill_latency: float = 0.0
    decode_latency: float = 0.0
    num_arrivals: int = 0
    histogram: list[int] = field(default_factory=list)
    _last_arrival: float | None = None

    def __post_init__(self) -> None:
        self.bin_width = max(1, -(-self.max_len // self.num_bins))
        self.histogram = [0] * self.num_bins

    def on_arrival(self, now: float, prompt_len: int) -> None:
        self.num_arrivals += 1
        self.histogram[min(prompt_len // self.bin_width, self.num_bins - 1)] += 1
        if self._last_arrival is not None and now > self._last_arrival:
            self.arrival_rate = self._ewma(self.arrival_rate, 1.0 / (now - self._last_arrival))
        self._last_arrival = now

    def on_step(self, duration: float, has_prefill: bool) -> None:
        self.step_latency = self._ewma(self.step_latency, duration)
        if has_prefill:
            self.prefill_latency = self._ewma(self.prefill_latency, duration)
        else:
            self.decode_latency = self._ewma(self.decode_latency, duration)

    def _ewma(self, old: float, sample: float) -> float:
        return sample if old == 0.0 else (1 - self.alpha) * old + self.alpha * sample
