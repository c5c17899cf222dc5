"""The engine loop: admission, one scheduling step at a time, outputs and stop strings."""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from bucketserve.config import EngineConfig, SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.ordering import targets
from bucketserve.core.policies import make_scheduler
from bucketserve.core.scheduler import BatchShape, ScheduledBatch
from bucketserve.core.sequence import FinishReason, Sequence
from bucketserve.engine.autotune import TunedPlans
from bucketserve.engine.calibration import CALIBRATION_TEXT
from bucketserve.engine.detokenizer import Detokenizer
from bucketserve.engine.device import resolve_device, resolve_dtype
from bucketserve.engine.handover import KVHandover, export_blocks, import_blocks
from bucketserve.engine.kv_cache import allocate_kv_cache, plan_num_blocks, resolve_kv_cache_dtype
from bucketserve.engine.loader import (
    cache_dir,
    load_state_dict,
    load_tokenizer,
    read_config,
    resolve_model_path,
)
from bucketserve.engine.model import LlamaModel, ModelArgs
from bucketserve.engine.model_runner import ModelRunner, StepResult
from bucketserve.engine.optimize import optimize_for_cpu
from bucketserve.engine.sampler import Sampler
from bucketserve.errors import ConfigError, InvalidRequestError
from bucketserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from bucketserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one engine step did; the engine keeps the most recent ones."""

    start: float
    duration: float
    schedule_time: float
    real_tokens: int
    padded_tokens: int
    preempted: int
    shape: BatchShape  # what the step computed, as the simulator's cost model charges it


@dataclass
class EngineStats:
    steps: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    preemptions: int = 0
    schedule_time: float = 0.0
    recent: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def padding_ratio(self) -> float:
        """Share of computed tokens that were padding."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detok: Detokenizer
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # when the request asked
    hand_over: bool = False  # a prefill instance's: hand the KV over after the first token
    kv_transfer_time: float | None = None  # a decode instance's: its KV's way here, in seconds


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, scheduler_config: SchedulerConfig | None = None):
        self.config = config = config or EngineConfig()
        self.scheduler_config = scheduler_config = scheduler_config or SchedulerConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_path = resolve_model_path(config.model, config.cache_dir)
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        self.args = ModelArgs.from_hf_config(read_config(self.model_path))
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        if self.max_model_len > self.args.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context length "
                f"{self.args.max_position_embeddings}"
            )
        t0 = time.perf_counter()
        model = LlamaModel(self.args, max_positions=self.max_model_len)
        model.load_hf_state_dict(load_state_dict(self.model_path))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.rotary.to(torch.float32)  # keep the rope tables exact
        # The weight formats per step size the CPU fast path tuned (None: it is off).
        self.tokenizer = load_tokenizer(self.model_path)
        self.weight_plans: TunedPlans | None = None
        if self.device.type == "cpu" and not config.enforce_eager:
            self.weight_plans = optimize_for_cpu(
                self.model,
                self.model_path,
                config.quantization,
                cache_dir(config.cache_dir),
                self.tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)[: self.max_model_len],
            )
        log.info(
            "loaded %s from %s on %s in %s (%.1f s)",
            self.model_name,
            self.model_path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - t0,
        )
        self.kv_cache_dtype = resolve_kv_cache_dtype(
            config.kv_cache_dtype, self.dtype, self.model.kernels, self.args, config.block_size
        )
        num_blocks = plan_num_blocks(config, self.args, self.kv_cache_dtype, self.device, self.max_model_len)
        # One block more than the block manager hands out: the runner's scratch block.
        kv_cache = allocate_kv_cache(
            self.args, num_blocks + 1, config.block_size, self.kv_cache_dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = make_scheduler(scheduler_config, self.block_manager, self.max_model_len)
        kernels = self.model.kernels
        self.sampler = Sampler(self.device, config.seed, kernels.argmax_rows if kernels else None)
        self.runner = ModelRunner(self.model, kv_cache, config.block_size, self.sampler)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(self.max_model_len, scheduler_config.max_num_seqs)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        # A decode instance's requests whose prompt KV comes from a prefill instance, oldest
        # first; those with blocks are reserved (``reserve_awaiting``), the rest wait for room.
        self._awaiting_kv: dict[str, _Request] = {}
        # What exists now (modules, tokenizer, imported libraries: ~300k objects) lives as long
        # as the engine. Frozen, the collector no longer walks it: a full collection of it
        # takes ~170 ms on this CPU, a stall for the step it lands in. (vLLM freezes too.)
        gc.collect()
        gc.freeze()

    # -- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def decode_token(self, token_id: int) -> str:
        """One token's text on its own (a piece of a multi-byte character decodes to U+FFFD)."""
        return self.tokenizer.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model's tokenizer has no chat template; send a plain prompt", "messages"
            )
        if not messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template error is a problem with the messages sent
            raise InvalidRequestError(
                f"cannot apply the chat template to these messages: {e}", "messages"
            ) from e
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
        predicted_output_len: int | None = None,
        hand_over: bool = False,
        await_kv: bool = False,
    ) -> Sequence:
        """Validate, annotate and queue a request (the gateway's job): its arrival time,
        priority (lower first), TTFT/TPOT targets in seconds and, optionally, a predicted
        output length (used by ``--bucket-reserve predicted``, SJF/LJF and UELLM).
        Raises InvalidRequestError and queues nothing if the request is bad.

        Disaggregated serving: with ``hand_over`` (a prefill instance) the request ends after
        its first token with its KV in the last output's ``kv_handover``; with ``await_kv`` (a
        decode instance) it waits for blocks (``reserve_awaiting``) and then for its prompt's
        KV (``attach_kv``) instead of running its prompt here."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            text, ids = prompt, self.tokenize(prompt)
        else:
            text, ids = None, list(prompt)
            if any(not 0 <= t < self.args.vocab_size for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.args.vocab_size})", "prompt"
                )
        seq = Sequence(
            request_id,
            ids,
            params,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            ttft_slo=ttft_slo,
            tpot_slo=tpot_slo,
            predicted_output_len=predicted_output_len,
            eos_token_id=self.eos_token_id,
        )
        req = _Request(seq, text, Detokenizer(self.tokenizer, ids, params.stop), hand_over=hand_over)
        if await_kv:
            self.scheduler.check_admissible(seq)
            self._awaiting_kv[request_id] = req
        else:
            self.scheduler.add(seq)  # raises if it can never be served
        self._requests[request_id] = req
        return seq

    # -- disaggregated serving: the decode instance's side ---------------------------------
    def reserve_awaiting(self) -> list[Sequence]:
        """Reserve KV blocks for a whole life (prompt + max_tokens), oldest first, for the
        requests whose prompt KV will come from a prefill instance, while seats and blocks
        last; return those reserved now. Their KV is then asked for: reserving first means
        the copy always has a place to land."""
        reserved: list[Sequence] = []
        waiting = [r.seq for r in self._awaiting_kv.values()]
        seats = self.free_seats - sum(1 for s in waiting if s.block_table)
        now = time.monotonic()
        for seq in waiting:
            if seq.block_table:
                continue
            if seats <= 0 or not self.block_manager.can_allocate(
                self.block_manager.blocks_needed(seq, seq.max_len)
            ):
                break  # first come, first served: nobody overtakes the oldest
            self.scheduler.reserve(seq)
            seq.first_scheduled_time = now
            seats -= 1
            reserved.append(seq)
        return reserved

    def attach_kv(self, request_id: str, handover: KVHandover) -> RequestOutput | None:
        """Write a reserved request's prompt KV and first token in, and decode it from the next
        step on; return the output with its first token (None if it was aborted meanwhile)."""
        req = self._awaiting_kv.get(request_id)
        if req is None:
            return None
        seq, now = req.seq, time.monotonic()
        assert seq.block_table, f"{request_id!r}'s KV arrived before its blocks were reserved"
        if handover.kv is not None:  # if this raises, the request still awaits (abort frees it)
            import_blocks(self.runner.kv_cache, seq.block_table, handover.kv)
        del self._awaiting_kv[request_id]
        req.kv_transfer_time = max(0.0, time.time() - handover.sent_at)
        seq.num_computed_tokens = handover.num_tokens
        seq.append_token(handover.first_token)
        seq.first_token_time = now
        if handover.logprobs is not None and seq.params.logprobs is not None:
            req.logprobs.append(handover.logprobs)
        stop_str = req.detok.add(handover.first_token)
        self.scheduler.attach(seq, now)
        if handover.finish_reason is None and stop_str is None:
            return self._output(req)
        # The first token ended it (the prefill instance says why; a stop string we see too).
        seq.stop_reason = handover.stop_reason if handover.finish_reason is not None else stop_str
        self.scheduler.finish(request_id, FinishReason(handover.finish_reason or FinishReason.STOP), now)
        out = self._output(req)
        del self._requests[request_id]
        return out

    @property
    def num_waiting(self) -> int:
        """Requests waiting to start: the scheduler's, and those awaiting KV blocks here."""
        return self.scheduler.num_waiting + sum(
            1 for r in self._awaiting_kv.values() if not r.seq.block_table
        )

    @property
    def num_queued(self) -> int:
        """Waiting requests that no free seat of the batch will take at the next step: the
        queue that admission bounds (two requests that reach an idle engine together are
        both waiting until it steps, but only one more than the free seats will wait)."""
        return max(0, self.num_waiting - self.free_seats)

    @property
    def free_seats(self) -> int:
        """Batch seats (``max_num_seqs``) no running request holds."""
        return max(0, self.scheduler_config.max_num_seqs - self.scheduler.num_running)

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are free when this returns."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if self._awaiting_kv.pop(request_id, None) is not None:
            self.block_manager.free(req.seq)  # its reservation, if it had one
        self.scheduler.finish(request_id, FinishReason.ABORT, time.monotonic())
        self.sampler.forget(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_kv)

    # -- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; return the outputs of the requests it advanced."""
        start = time.monotonic()
        batch = self.scheduler.schedule(start)
        schedule_time = time.monotonic() - start
        if batch is None:
            return []
        shape = batch.shape()
        try:
            result = self.runner.execute(batch)
        except Exception:
            # One bad batch fails its own requests only; the engine and the rest go on.
            log.exception("a batch of %d sequences failed; their requests end with an error", len(batch))
            result = None
        now = time.monotonic()
        if result is None:
            advanced = finished = self._fail(batch, now)
        else:
            finished = self.scheduler.update(batch, result.tokens, now)
            advanced, stopped = self._detokenize(batch, result, now)
            finished += stopped
        self._record(batch, shape, start, now, schedule_time)
        if result is not None:
            self.scheduler.observe_step(shape, now - start)
        outputs = []
        for seq in advanced:
            req = self._requests[seq.seq_id]
            # A prefill instance hands over what has its first token (a failed batch's rows
            # end with their error, as on any engine).
            if req.hand_over and seq.output_token_ids:
                if not seq.is_finished:
                    finished.append(seq)  # it leaves this engine with its hand-over
                outputs.append(self._hand_over(req))
            else:
                outputs.append(self._output(req))
        # Prompts dropped from the queue as late (Scheduler.drop_late) end with no token.
        late = (s for s in finished if s.finish_reason is FinishReason.LATE)
        outputs += [self._output(self._requests[s.seq_id]) for s in late]
        for seq in finished:
            del self._requests[seq.seq_id]
            self.sampler.forget(seq.seq_id)
        return outputs

    def _hand_over(self, req: _Request) -> RequestOutput:
        """A prefill instance's request after its first token: detach it and copy its prompt's
        KV out (unless that token ended it); the output is its last, carrying the hand-over."""
        seq = req.seq
        kv = None
        if not seq.is_finished:
            blocks = self.scheduler.detach(seq)
            kv = export_blocks(self.runner.kv_cache, blocks, seq.num_computed_tokens, self.config.block_size)
            self.scheduler.release_blocks(blocks)
        out = self._output(req)
        out.finished = True
        out.kv_handover = KVHandover(
            first_token=seq.output_token_ids[0],
            num_tokens=seq.num_computed_tokens,
            kv=kv,
            logprobs=req.logprobs[0] if req.logprobs else None,
            finish_reason=None if seq.finish_reason is None else seq.finish_reason.value,
            stop_reason=seq.stop_reason,
        )
        return out

    def _fail(self, batch: ScheduledBatch, now: float) -> list[Sequence]:
        """End every request of a batch that raised (``finish_reason="error"``)."""
        failed = (self.scheduler.finish(s.seq_id, FinishReason.ERROR, now) for s in batch.seqs)
        return [s for s in failed if s is not None]

    def _detokenize(
        self, batch: ScheduledBatch, result: StepResult, now: float
    ) -> tuple[list[Sequence], list[Sequence]]:
        """Feed each sampled token to its request's detokenizer and keep its logprobs; end at
        a stop string what the scheduler left running. Returns (advanced, stopped here)."""
        advanced, stopped = [], []
        for seq, tok, lp in zip(batch.seqs, result.tokens, result.logprobs, strict=True):
            if tok is None:
                continue
            req = self._requests[seq.seq_id]
            if lp is not None:
                req.logprobs.append(lp)
            stop_str = req.detok.add(tok)
            if stop_str is not None and not seq.is_finished:
                seq.stop_reason = stop_str
                self.scheduler.finish(seq.seq_id, FinishReason.STOP, now)
                stopped.append(seq)
            advanced.append(seq)
        return advanced, stopped

    def _record(
        self, batch: ScheduledBatch, shape: BatchShape, start: float, end: float, schedule_time: float
    ) -> None:
        s = self.stats
        rec = StepRecord(
            start=start,
            duration=end - start,
            schedule_time=schedule_time,
            real_tokens=batch.num_real_tokens,
            padded_tokens=batch.num_padded_tokens,
            preempted=len(batch.preempted),
            shape=shape,
        )
        s.steps += 1
        s.real_tokens += rec.real_tokens
        s.padded_tokens += rec.padded_tokens
        s.preemptions += rec.preempted
        s.schedule_time += schedule_time
        s.recent.append(rec)

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        done = seq.finish_reason is not None
        # The targets it was scheduled against, on the last output (what SLO attainment reads).
        ttft_slo, tpot_slo = targets(seq, self.scheduler_config.order) if done else (None, None)
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=req.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=req.detok.visible_text(done),
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason.value if done else None,
                    stop_reason=seq.stop_reason,
                    logprobs=list(req.logprobs) if seq.params.logprobs is not None else None,
                )
            ],
            finished=done,
            metrics=RequestMetrics(
                arrival_time=seq.arrival_time,
                first_scheduled_time=seq.first_scheduled_time,
                first_token_time=seq.first_token_time,
                finished_time=seq.finished_time or (time.monotonic() if done else None),
                num_preemptions=seq.num_preemptions,
                ttft_slo=ttft_slo,
                tpot_slo=tpot_slo,
                kv_transfer_time=req.kv_transfer_time,
            ),
        )
