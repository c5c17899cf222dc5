"""Shared fixtures: a tiny random-weight Llama with its own small tokenizer, built once per
session as a Hugging Face folder, and engines over it that must end with no KV block in use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Bucket-based batching groups requests of similar length to reduce padding.",
    "Large language models generate text one token at a time.",
    "Hello, world! 0123456789 symbols: #$%&*()[]{}<>",
] * 20


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def build_tiny_model(path: Path, seed: int = 0, **overrides: object) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def assert_no_leaks(engine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests(), "requests left unfinished"
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_used_blocks} KV blocks leaked"


@pytest.fixture(scope="session")
def engine_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where the tiny engines keep their native kernels and tuned plans: the test session's
    own, so tests neither read nor fill the user's ~/.cache/bucketserve."""
    return str(tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture
def make_llm(tiny_model_dir: Path, engine_cache_dir: str) -> Iterator:
    """Build LLMs over the tiny model (fp32, small KV pool); each must end with no leaked block."""
    from bucketserve import LLM

    made = []

    def make(**kwargs: object) -> LLM:
        opts = {
            "dtype": "float32",
            "device": "cpu",
            "kv_cache_memory": 2**20,
            "cache_dir": engine_cache_dir,
            **kwargs,
        }
        llm = LLM(str(tiny_model_dir), **opts)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_no_leaks(llm.engine)


@pytest.fixture
def llm(make_llm):
    return make_llm()
