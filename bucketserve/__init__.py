"""bucketserve: an LLM inference server with bucket-based dynamic batching."""

from bucketserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from bucketserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
