"""Turns the last-position logits of a batch into next tokens, row by row parameters."""

from __future__ import annotations

import torch

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
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, p in enumerate(params):
            if p.greedy:
                out.append(greedy[i])
                continue
            row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = row.softmax(-1)
            # Exponential race (Gumbel-max in another form): argmax(p / E), E ~ Exp(1).
            noise = torch.empty_like(probs).exponential_(generator=self._generator(seq_ids[i], p))
            out.append(int((probs / noise).argmax()))
        return out
