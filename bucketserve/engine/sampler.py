"""Turns the last-position logits of a batch into next tokens, row by row parameters."""

from __future__ import annotations

import torch

from bucketserve.outputs import TokenLogprobs
from bucketserve.sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; always keep the best.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Greedy, temperature, top-k and top-p sampling with a generator per seeded request.

    Tokens excluded by top-k/top-p have probability 0, so the CDF is flat over them and the
    search (right=True) never lands on one.

    A seeded request draws its randomness from its own generator only, so its output does
    not depend on what else shares its batches.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
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
        out = logits.argmax(-1).tolist()
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return out
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        scaled = logits[rows] / temps.unsqueeze(1)
        for j, i in enumerate(rows):
            if params[i].top_k or params[i].top_p < 1.0:
                scaled[j] = _filter_top_k_top_p(scaled[j], params[i].top_k, params[i].top_p)
        # Inverse-CDF sampling: one uniform draw per row. (torch.multinomial and the
        # exponential race draw one random number per vocabulary entry: 1 ms a row here.)
        cdf = scaled.softmax(-1).cumsum_(-1)
        # Rows without a seed share the engine's generator; a seeded row draws from its own
        # generator, so that its output does not depend on its batch-mates.
        u = torch.rand(len(rows), 1, generator=self.default_generator, device=logits.device)
        for j, i in enumerate(rows):
            if params[i].seed is not None:
                u[j] = torch.rand(1, generator=self._generator(seq_ids[i], params[i]), device=logits.device)
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
        for j, tok in enumerate(drawn.flatten().tolist()):
            out[rows[j]] = tok
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
