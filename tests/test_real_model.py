"""A few checks on the embedded SmolLM2-135M-Instruct (converted once into the cache)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bucketserve import LLM, SamplingParams

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
]


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048)


def test_greedy_outputs_equal_hf_greedy(smol: LLM) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smol.engine.model_path, dtype=torch.float32).eval()
    tok = smol.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ours = smol.chat(convs, params, use_tqdm=False)
    for conv, out in zip(convs, ours, strict=True):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = ref.generate(**ids, max_new_tokens=24, do_sample=False)
        expected = gen[0, ids["input_ids"].shape[1] :].tolist()
        assert out.outputs[0].token_ids == expected, conv[0]["content"]
    bm = smol.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def _cli_answer(*options: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bucketserve",
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "32",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_answers_paris_in_float32() -> None:
    """In float32 (exact weights: the engine's greedy tokens are transformers') the embedded
    model answers the README's question with Paris. Under the defaults its first token is a
    near tie ("The" 26.0 against "L" 25.75) that the start-up tuning's timing-chosen weight
    formats tip either way (docs/RESULTS.md), so a fresh machine may answer otherwise there."""
    assert "Paris" in _cli_answer("--dtype", "float32", "--kv-cache-memory", "512MiB")


def test_cli_generates_an_answer_with_the_defaults() -> None:
    assert _cli_answer("--kv-cache-memory", "256MiB").strip()
