"""The engine on a CUDA device (skipped where torch sees none, as in CI): its greedy tokens are
Hugging Face transformers' on the same GPU and random weights, under the bucket and continuous
policies, with its decode steps replayed as CUDA graphs (the default) and eagerly; in bf16 its
steps with prompt tokens attending in one varlen call give the unpacked path's logits.
Run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_packed_prefill import record_step_logits

from bucketserve import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

OUTPUT_LEN = 24


@pytest.mark.parametrize(("policy", "eager"), [("bucket", False), ("continuous", False), ("bucket", True)])
def test_greedy_tokens_on_cuda_are_transformers_tokens(
    make_llm, tiny_model_dir: Path, policy: str, eager: bool
) -> None:
    from transformers import AutoModelForCausalLM

    llm = make_llm(device="cuda", policy=policy, enforce_eager=eager)
    prompts = [f"The quick brown fox {i} jumps over the lazy dog {i * 7}." * (1 + i % 4) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
    graphs = llm.engine.runner.decode_graphs
    if eager:
        assert graphs is None
    else:  # every decode-only step replayed a captured graph
        assert graphs is not None and graphs.graphs and graphs.num_steps >= OUTPUT_LEN - 1

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        for out in outs:
            ids = torch.tensor([out.prompt_token_ids], device="cuda")
            want = ref.generate(
                ids, max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False, pad_token_id=2
            )
            assert out.outputs[0].token_ids == want[0, ids.shape[1] :].tolist()


def test_packed_rows_on_cuda_give_the_unpacked_steps_logits(
    make_llm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 (torch's varlen flash attention needs a half type), chunks over cached context
    under a 64-token step budget: each step's logits with its rows in one varlen call are
    the unpacked path's within bf16 rounding, and so are most greedy tokens. One token a
    request, so that a token flipped by rounding feeds no later step."""
    prompts = [" ".join(f"w{j}" for j in range(4 + 8 * i)) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    logits, tokens = {}, {}
    for packed in (True, False):
        llm = make_llm(device="cuda", dtype="bfloat16", policy="continuous", max_num_batched_tokens=64)
        runner = llm.engine.runner
        assert runner.packed_attention  # the default on CUDA in bf16
        runner.packed_attention = packed
        logits[packed] = record_step_logits(monkeypatch, runner)
        outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
        tokens[packed] = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(logits[True]) == len(logits[False]) > 8
    for a, b in zip(logits[True], logits[False], strict=True):
        assert a.shape == b.shape
        if b.numel():  # a step that ends no prompt samples nothing
            assert (a - b).abs().max() <= 0.05 * b.abs().max()
    assert sum(x == y for x, y in zip(tokens[True], tokens[False], strict=True)) >= 7
