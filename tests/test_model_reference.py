"""Our Llama implementation against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from bucketserve.core.block_manager import BlockManager
from bucketserve.core.scheduler import ScheduledBatch
from bucketserve.core.sequence import Sequence
from bucketserve.engine import kernels
from bucketserve.engine.kv_cache import allocate_kv_cache
from bucketserve.engine.loader import load_state_dict, read_config
from bucketserve.engine.model import LlamaModel, ModelArgs
from bucketserve.engine.model_runner import ModelRunner
from bucketserve.sampling_params import SamplingParams
from tests.conftest import build_tiny_model

TOL = 1e-4
BLOCK = 4


class LogitsCapture:
    """A stand-in sampler that records, per step, the logits of each sequence and picks argmax."""

    def __init__(self) -> None:
        self.logits: list[dict[str, torch.Tensor]] = []

    def __call__(self, logits, seq_ids, params, banned):
        self.logits.append({sid: row.clone() for sid, row in zip(seq_ids, logits, strict=True)})
        return logits.argmax(-1).tolist()


@pytest.fixture(params=["torch", "native"], autouse=True)
def attention_path(request, tmp_path_factory) -> str:
    """Every test here runs twice: decode attention through the torch reference, and through
    the native kernel (skipped only where no C++ compiler can build it)."""
    global _KERNELS
    if request.param == "native":
        _KERNELS = kernels.load(tmp_path_factory.getbasetemp() / "kernels-cache")
        if _KERNELS is None:
            pytest.fail("the native kernels did not build: install a C++ compiler (g++)")
    else:
        _KERNELS = None
    return request.param


_KERNELS = None


def make_runner(path, num_blocks: int = 64):
    args = ModelArgs.from_hf_config(read_config(path))
    model = LlamaModel(args)
    model.load_hf_state_dict(load_state_dict(path))
    model.eval()
    model.use_kernels(_KERNELS)
    cache = allocate_kv_cache(args, num_blocks + 1, BLOCK, torch.float32, torch.device("cpu"))
    capture = LogitsCapture()
    return ModelRunner(model, cache, BLOCK, capture), BlockManager(num_blocks, BLOCK), capture


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def run_step(runner, bm, seqs, counts, padded=False):
    for seq, n in zip(seqs, counts, strict=True):
        bm.allocate(seq, seq.num_computed_tokens + n)
    batch = ScheduledBatch(list(seqs), list(counts), padded=padded)
    tokens = runner.execute(batch).tokens
    for seq, n in zip(seqs, counts, strict=True):
        seq.num_computed_tokens += n
    return tokens


PROMPTS = [[5, 17, 33, 101, 7, 9, 250, 3, 44], [12, 400, 8], [60, 61, 62, 63, 64, 65]]


@pytest.fixture(scope="module", params=["llama", "llama-untied-llama3-rope", "qwen2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return build_tiny_model(path)
    if request.param == "qwen2":
        import torch as _t
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from tests.conftest import TINY_CONFIG, build_tokenizer

        _t.manual_seed(1)
        cfg = {k: v for k, v in TINY_CONFIG.items() if k != "pad_token_id"}
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
        # Non-zero biases so that the test sees them.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                _t.nn.init.normal_(proj.bias, std=0.5)
        model.save_pretrained(path)
        build_tokenizer(path)
        return path
    return build_tiny_model(
        path,
        seed=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_batched_prefill_of_different_lengths_matches_hf(model_dir, padded: bool) -> None:
    runner, bm, capture = make_runner(model_dir)
    ref = hf_model(model_dir)
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(PROMPTS)]
    run_step(runner, bm, seqs, [len(p) for p in PROMPTS], padded=padded)
    ours = capture.logits[-1]
    for i, p in enumerate(PROMPTS):
        diff = (ours[str(i)] - hf_logits(ref, p)[-1]).abs().max().item()
        assert diff < TOL, f"prompt {i}: max abs diff {diff}"


def test_step_by_step_decode_matches_hf(model_dir) -> None:
    runner, bm, capture = make_runner(model_dir)
    ref = hf_model(model_dir)
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(PROMPTS)]
    tokens = run_step(runner, bm, seqs, [len(p) for p in PROMPTS])
    for _ in range(6):  # decode all three together, contexts of different lengths
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.output_token_ids.append(tok)
        tokens = run_step(runner, bm, seqs, [1, 1, 1])
        for i, seq in enumerate(seqs):
            expected = hf_logits(ref, seq.token_ids)[-1]
            diff = (capture.logits[-1][seq.seq_id] - expected).abs().max().item()
            assert diff < TOL, f"seq {i} at length {len(seq)}: max abs diff {diff}"


def test_chunked_prefill_matches_hf(model_dir) -> None:
    """A prompt computed in uneven chunks, beside another sequence, gives the same logits."""
    runner, bm, capture = make_runner(model_dir)
    ref = hf_model(model_dir)
    long_prompt = PROMPTS[0] + PROMPTS[2]  # 15 tokens
    a = Sequence("a", long_prompt, SamplingParams())
    b = Sequence("b", PROMPTS[1], SamplingParams())
    assert run_step(runner, bm, [a, b], [5, 3]) == [None, capture.logits[-1]["b"].argmax().item()]
    run_step(runner, bm, [a], [7])  # still short of the end: nothing sampled
    assert len(capture.logits) == 1
    run_step(runner, bm, [a], [3])
    diff = (capture.logits[-1]["a"] - hf_logits(ref, long_prompt)[-1]).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"
