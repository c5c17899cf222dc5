"""Turns the last-position logits of a batch into next tokens, row by row parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bucketserve.outputs import TokenLogprobs
from bucketserve.sampling_params import SamplingParams


def _candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits a row may sample from, most likely first where they are ranked, and their
    token ids (None: the whole vocabulary in id order).

    top-k takes its k candidates before anything is sorted, so a top-k row sorts k logits,
    not the vocabulary (49,152 for SmolLM2); top-p then drops every candidate whose
    higher-ranked ones already reach top_p (the best is always kept)."""
    if top_k > 0 and top_k < logits.numel():
        values, ids = torch.topk(logits, top_k)
    elif top_p < 1.0:
        values, ids = torch.sort(logits, descending=True)
    else:
        return logits, None
    if top_p < 1.0:
        probs = values.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        values = values.masked_fill(drop, float("-inf"))
    return values, ids


def _torch_argmax_rows(logits: torch.Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


class Sampler:
    """Greedy, temperature, top-k and top-p sampling with a generator per seeded request.

    A seeded request draws its randomness from its own generator only, so its output does
    not depend on what else shares its batches.
    """

    def __init__(
        self,
        device: torch.device,
        seed: int = 0,
        argmax_rows: Callable[[torch.Tensor], list[int]] | None = None,
    ) -> None:
        """``argmax_rows``: the greedy rows' argmax (the native one, where the kernels load);
        torch's otherwise."""
        self.device = device
        self.argmax_rows = argmax_rows or _torch_argmax_rows
        self.default_generator = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.default_generator
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
            self._generators[seq_id] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,  # [N, vocab] fp32
        seq_ids: list[str],
        params: list[SamplingParams],
        banned: list[list[int]],  # per row: token ids not allowed yet (min_tokens)
    ) -> list[int]:
        for i, ban in enumerate(banned):
            if ban:
                logits[i, ban] = float("-inf")
        rows = [i for i, p in enumerate(params) if not p.greedy]
        greedy = [i for i, p in enumerate(params) if p.greedy]
        out = [0] * len(params)
        if greedy:
            chosen = logits if not rows else logits[greedy]
            for i, tok in zip(greedy, self.argmax_rows(chosen), strict=True):
                out[i] = tok
        if not rows:
            return out
        # Rows without a seed share the engine's generator; a seeded row draws from its own
        # generator, so that its output does not depend on its batch-mates.
        u = torch.rand(len(rows), generator=self.default_generator, device=logits.device)
        for j, i in enumerate(rows):
            p = params[i]
            if p.seed is not None:
                u[j] = torch.rand(1, generator=self._generator(seq_ids[i], p), device=logits.device)
            values, ids = _candidates(logits[i] / p.temperature, p.top_k, p.top_p)
            # Inverse-CDF sampling: one uniform draw per row. (torch.multinomial and the
            # exponential race draw one random number per candidate: 1 ms a row here.) The CDF
            # is flat over excluded candidates (probability 0), so the search never lands on one.
            cdf = values.softmax(-1).cumsum_(-1)
            t = int(torch.searchsorted(cdf, u[j : j + 1] * cdf[-1], right=True).clamp_(max=cdf.numel() - 1))
            out[i] = t if ids is None else int(ids[t])
        return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Each row's sampled token's log-probability and its ``num_top[i]`` most likely tokens,
    from raw ``logits`` [N, vocab] (taken before the sampler masks or scales them)."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).view(-1, 1)).flatten().tolist()
    k = max(num_top, default=0)
    top_lp, top_ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    out = []
    for i, (tok, lp) in enumerate(zip(tokens, chosen, strict=True)):
        n = num_top[i]
        top = tuple(zip(top_ids[i, :n].tolist(), top_lp[i, :n].tolist(), strict=True))
        out.append(TokenLogprobs(tok, lp, top))
    return out
