"""The decode step that the CUDA graphs replay (engine/cuda_graphs.py), run eagerly on the CPU:
its rows padded to the next captured batch size and its block tables to the next captured
width, it must sample what the unpadded step samples. (On a GPU, tests/test_cuda.py checks
the captured graphs against transformers.)"""

from __future__ import annotations

from bucketserve import SamplingParams


def test_the_padded_decode_step_samples_the_unpadded_steps_tokens(make_llm) -> None:
    prompts = [f"The quick brown fox {i} jumps over the lazy dog {i * 7}." * (1 + i % 4) for i in range(13)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def tokens(llm) -> list[list[int]]:  # type: ignore[no-untyped-def]
        outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    # The torch paths, as on a GPU; 4-token blocks, so that contexts span both widths.
    plain = make_llm(enforce_eager=True, block_size=4)
    padded = make_llm(enforce_eager=True, block_size=4)
    runner = padded.engine.runner
    runner.capture_decode_graphs(padded.engine.max_model_len, max_batch=16, capture=False)
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16] and graphs.widths == [16, 64]
    assert tokens(padded) == tokens(plain)
    assert graphs.num_steps >= 19  # every decode-only step of the 19 after the prompts' first tokens
    assert not graphs.graphs  # nothing captured off a GPU


def test_a_decode_graph_bucket_is_the_next_captured_size_and_width(make_llm) -> None:
    llm = make_llm(enforce_eager=True, block_size=4)
    llm.engine.runner.capture_decode_graphs(llm.engine.max_model_len, max_batch=12, capture=False)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    assert graphs.sizes == [1, 2, 4, 8, 12]  # the scheduler's largest batch is captured too
    assert graphs.fits(12, 64) and graphs.fits(1, 1)
    assert not graphs.fits(13, 64) and not graphs.fits(1, 65) and not graphs.fits(0, 1)
