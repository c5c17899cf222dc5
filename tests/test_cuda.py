"""The engine on a CUDA device (skipped where torch sees none, as in CI): its greedy tokens are
Hugging Face transformers' on the same GPU and random weights, under the bucket and continuous
policies, with its decode steps replayed as CUDA graphs (the default) and eagerly.
Run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
