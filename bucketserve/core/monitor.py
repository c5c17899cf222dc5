"""The global monitor: the load statistics a policy reads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Monitor:
    """A histogram of the prompt lengths admitted so far, in ``num_bins`` equal bins over
    [0, max_len): the length distribution the DP-optimal bucket edges are fitted to."""

    max_len: int
    num_bins: int = 64
    histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bin_width = max(1, -(-self.max_len // self.num_bins))
        self.histogram = [0] * self.num_bins

    def on_arrival(self, prompt_len: int) -> None:
        self.histogram[min(prompt_len // self.bin_width, self.num_bins - 1)] += 1
