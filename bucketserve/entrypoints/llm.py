"""Offline inference in vLLM's shape: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from bucketserve.config import OFFLINE_SCHEDULER_DEFAULTS, EngineConfig, SchedulerConfig, with_options
from bucketserve.engine.llm_engine import LLMEngine
from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import RequestOutput
from bucketserve.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Load a model once and generate for many prompts, batched by the scheduler.

    Options are given as configs, as keywords, or both (keywords override the configs'
    fields): any field of EngineConfig (dtype, device, kv_cache_memory, ...) or of
    SchedulerConfig (policy, max_num_seqs, order, policy_config, ...). Values are read and
    checked as on the command line: ``LLM(kv_cache_memory="1GiB", policy="static",
    policy_config={"batch_size": 4})``; a bad value raises ConfigError with one line.
    Without a scheduler config, the limits start from OFFLINE_SCHEDULER_DEFAULTS (256
    sequences, 4096 tokens a step), larger than the server's: offline, throughput is the aim.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        engine_config: EngineConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        **options: Any,
    ) -> None:
        if model is not None:
            options["model"] = model
        engine_config, scheduler_config = with_options(
            engine_config, scheduler_config, options, OFFLINE_SCHEDULER_DEFAULTS
        )
        self.engine = LLMEngine(engine_config, scheduler_config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or a list of token ids); outputs in input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run(list(prompts), sampling_params, use_tqdm)  # type: ignore[arg-type]

    def chat(
        self,
        messages: Messages | Seq[Messages],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or several, through the chat template."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        prompts = [self.engine.apply_chat_template(list(m)) for m in messages]  # type: ignore[arg-type]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(
        self,
        prompts: list[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(prompts)} prompts but {len(params)} sampling params", "sampling_params"
                )
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, p)
                ids.append(rid)
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            # A bad prompt or an interrupt: release everything this call queued.
            for rid in ids:
                engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]
