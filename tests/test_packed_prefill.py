"""A step with prompt tokens attending in one varlen call (``PackedRows``, on CUDA).

torch's ``varlen_attn`` runs on CUDA only; here references with its documented semantics
(each row's queries over its keys, causal from the bottom right), in each of its signatures,
stand in for it, so that the runner's packing (slots, row offsets, lengths) and the layer's
gather are checked on the CPU: the packed step must compute the unpacked step's logits.
tests/test_cuda.py runs the real kernel against the unpacked path on a GPU."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bucketserve import SamplingParams
from bucketserve.engine import model as model_module


def reference_varlen_attn(
    query: torch.Tensor,  # [Tq, H, D]
    key: torch.Tensor,  # [Tk, Hkv, D]
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    window_size: tuple[int, int],
    enable_gqa: bool,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` of torch 2.12 on, causal (window (-1, 0),
    aligned at the bottom right), one SDPA per row."""
    assert window_size == (-1, 0) and enable_gqa
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    out = torch.empty_like(query)
    for i in range(len(cu_seq_q) - 1):
        q0, q1, k0, k1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1]), int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        n, used = q1 - q0, k1 - k0
        assert n <= max_q and used <= max_k
        q = query[q0:q1].transpose(0, 1).unsqueeze(0)
        k = key[k0:k1].transpose(0, 1).unsqueeze(0)
        v = value[k0:k1].transpose(0, 1).unsqueeze(0)
        visible = torch.ones(n, used, dtype=torch.bool).tril(used - n)  # bottom-right causal
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def reference_varlen_attn_torch211(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rows: object, window_size: tuple[int, int]
) -> torch.Tensor:
    """The same in torch 2.11's signature: a window; K and V with as many heads as the query."""
    assert key.shape[1] == query.shape[1]
    return reference_varlen_attn(query, key, value, *rows, window_size=window_size, enable_gqa=True)  # type: ignore[arg-type]


def reference_varlen_attn_torch210(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rows: object, is_causal: bool = False
) -> torch.Tensor:
    """The same in torch 2.10's signature: ``is_causal``; as many heads as the query."""
    assert is_causal
    return reference_varlen_attn_torch211(query, key, value, *rows, window_size=(-1, 0))


def record_step_logits(monkeypatch: pytest.MonkeyPatch, runner) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """A list that each step of ``runner`` appends its logits to (a copy, on the CPU)."""
    steps: list[torch.Tensor] = []
    sample = runner._sample

    def recorded(seqs, order, rows, step_logits, size):  # type: ignore[no-untyped-def]
        steps.append(step_logits.float().cpu())
        return sample(seqs, order, rows, step_logits, size)

    monkeypatch.setattr(runner, "_sample", recorded)
    return steps


@pytest.mark.parametrize(
    "reference", [reference_varlen_attn, reference_varlen_attn_torch211, reference_varlen_attn_torch210]
)
@pytest.mark.parametrize("budget", [64, 200])
def test_packed_rows_give_the_unpacked_steps_logits(
    make_llm, monkeypatch: pytest.MonkeyPatch, reference, budget: int
) -> None:
    """Prompts of 11-227 tokens under a 64- or 200-token step budget: chunks over cached
    context, several prompts in one step, decode rows beside them. With every step that has
    prompt tokens attending in one packed call, each step's logits (and so the greedy
    tokens) are those of the chunk-by-chunk and masked-decode path. (``continuous``: its
    steps do not depend on measured step times, so both runs schedule alike.)"""
    calls = []

    @functools.wraps(reference)  # the signature that says which of torch's it is
    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return reference(*args, **kwargs)

    monkeypatch.setattr(model_module, "varlen_attn", counted)
    prompts = [" ".join(f"w{j}" for j in range(4 + 8 * i)) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens, logits = {}, {}
    for packed in (False, True):
        llm = make_llm(policy="continuous", enforce_eager=True, max_num_batched_tokens=budget)
        runner = llm.engine.runner
        assert not runner.packed_attention  # a CPU: the unpacked path by default
        runner.packed_attention = packed
        logits[packed] = record_step_logits(monkeypatch, runner)
        outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
        tokens[packed] = [o.outputs[0].token_ids for o in outs]
        assert bool(calls) == packed
    assert len(logits[True]) == len(logits[False]) > 8
    for packed_step, unpacked_step in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(packed_step, unpacked_step, atol=1e-4, rtol=1e-4)
    assert tokens[True] == tokens[False]
