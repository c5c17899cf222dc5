"""Step latency, KV capacity and KV transfer time: what the simulator charges for a batch.

The formula family is DistServe's (see ``bucketserve/data/profiles/README.md``), and the
formula itself is the core's (``bucketserve.core.cost``: the engine's scheduler predicts
steps with it too). A ``padded`` batch (static,
uellm) pays for every prefill row padded to the longest one and every decode row (ghost
rows included) at the longest context, as a static-batching engine with a dense KV cache
computes them. Our own engine runs static batches on its paged cache: it pads their prefill
rows, but its decode rows read their own contexts and a ghost row reads one token; a
profile of it says so with ``padded_decode`` false.
``pad_prefill`` charges every policy's prefill rows padded to the longest in their batch:
an engine without ragged attention kernels, where BucketServe's length buckets pay off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from bucketserve.core.cost import Profile, step_ms
from bucketserve.core.scheduler import BatchShape, ScheduledBatch
from bucketserve.wire import ProfileFile, read_json

__all__ = ["PUBLISHED", "CostModel", "Profile", "kv_capacity_tokens", "kv_transfer_s", "load_profile"]

PUBLISHED = {"a100-distserve": "a100-80g-distserve.json", "a100-vllm": "a100-80g-vllm.json"}

# OPT-13B (40 layers, hidden 5120, MHA): the published profiles' model.
OPT_13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2  # K and V, fp16
OPT_13B_WEIGHT_BYTES = 13_000_000_000 * 2  # fp16; stands in for LLaMA-2-13B (13.0B params)
GB = 1_000_000_000


def _read_profile_file(source: str) -> ProfileFile:
    if source in PUBLISHED:
        text = resources.files("bucketserve").joinpath("data", "profiles", PUBLISHED[source]).read_text()
        return ProfileFile.from_dict(json.loads(text), source)
    return ProfileFile.from_dict(read_json(source), source)


def load_profile(source: str, model: str | None = None, tp: int = 1) -> Profile:
    """A profile from a published name ("a100-distserve", "a100-vllm") or a JSON path.

    Our measured profiles also carry ``kv_bytes_per_token`` and ``weight_bytes``. ``model``
    may be left out when the file holds one model; published files default to facebook/opt-13b.
    """
    models = _read_profile_file(source).models
    if model is None and len(models) == 1:
        model = next(iter(models))
    elif model is None and "facebook/opt-13b" in models:
        model = "facebook/opt-13b"
    if model not in models:
        raise ValueError(f"profile {source!r} has no model {model!r}; it has {', '.join(models)}")
    profile = models[model].get(tp)
    if profile is None:
        raise ValueError(f"profile {source!r} has no tensor-parallel degree {tp} for {model}")
    return profile


def kv_capacity_tokens(
    gpu_memory_bytes: float,
    num_gpus: int,
    weight_bytes: float,
    kv_bytes_per_token: int,
    utilization: float = 0.9,
) -> int:
    """KV tokens that fit on ``num_gpus`` GPUs: ``utilization`` of their memory (the rest is
    activations and the CUDA context, as vLLM's gpu_memory_utilization) minus the weights."""
    free = gpu_memory_bytes * num_gpus * utilization - weight_bytes
    if free <= 0:
        raise ValueError(
            f"the weights ({weight_bytes / GB:.1f} GB) do not fit in {num_gpus} x "
            f"{gpu_memory_bytes / GB:.0f} GB at utilization {utilization}"
        )
    return int(free // kv_bytes_per_token)


def kv_transfer_s(num_tokens: int, kv_bytes_per_token: int, bandwidth_bytes_per_s: float) -> float:
    """Seconds to move ``num_tokens`` tokens of KV cache over a link."""
    return num_tokens * kv_bytes_per_token / bandwidth_bytes_per_s


@dataclass
class CostModel:
    """Charges a ScheduledBatch in seconds of virtual time from a Profile."""

    profile: Profile
    pad_prefill: bool = False  # charge every prefill batch padded (an engine without ragged kernels)

    def computed_tokens(self, batch: ScheduledBatch) -> int:
        """Tokens the executor computes for ``batch``, padding and ghost rows included."""
        return batch.computed_tokens(batch.padded or self.pad_prefill)

    def step_time(self, batch: ScheduledBatch) -> float:
        """Seconds to run ``batch``, charged before it runs (it reads the sequences' progress)."""
        return self.shape_time(batch.shape())

    def shape_time(self, shape: BatchShape) -> float:
        """Seconds to run a batch of this shape (``bucketserve.core.cost.step_ms``, the
        engine's scheduler's cost model too)."""
        return step_ms(self.profile, shape, self.pad_prefill) / 1e3
