"""The engine end to end on the tiny random-weight model."""

from __future__ import annotations

import pytest

from bucketserve import SamplingParams
from bucketserve.errors import ConfigError, InvalidRequestError, ModelNotFoundError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Hello",
    "Bucket-based batching groups requests of similar length to reduce padding. " * 3,
]


def test_generate_returns_outputs_in_input_order_with_the_asked_length(llm) -> None:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert len(o.outputs[0].token_ids) == 12
        assert o.outputs[0].text == llm.get_tokenizer().decode(
            o.outputs[0].token_ids, skip_special_tokens=True
        )


def test_batched_greedy_output_equals_one_by_one(llm) -> None:
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone


def test_chunked_prefill_and_preemption_do_not_change_greedy_output(make_llm) -> None:
    reference = [o.outputs[0].token_ids for o in make_llm().generate(PROMPTS, GREEDY, use_tqdm=False)]
    # A 7-token budget chunks the long prompt; a pool of 6 blocks x 16 tokens (the tiny model
    # stores 512 bytes of KV per token) cannot hold everything admitted, so sequences get preempted.
    tight = make_llm(
        policy="continuous", max_num_batched_tokens=7, kv_cache_memory=6 * 16 * 512, max_model_len=96
    )
    outs = tight.generate(PROMPTS * 3, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference * 3
    assert tight.engine.stats.preemptions > 0


@pytest.mark.parametrize("policy", ["bucket", "static", "uellm", "distserve"])
def test_every_policy_gives_the_same_greedy_outputs(make_llm, policy: str) -> None:
    reference = make_llm(policy="continuous").generate(PROMPTS * 3, GREEDY, use_tqdm=False)
    outs = make_llm(policy=policy).generate(PROMPTS * 3, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]


def test_static_batches_pad_and_keep_finished_rows(make_llm) -> None:
    llm = make_llm(policy="static")
    lengths = [2, 9]
    llm.generate(
        PROMPTS[:2],
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths],
        use_tqdm=False,
    )
    s = llm.engine.stats
    prompt_lens = [len(llm.engine.tokenize(p)) for p in PROMPTS[:2]]
    # one padded prefill (2 rows x longest prompt), then 8 decode steps of 2 rows each
    assert s.padded_tokens == 2 * max(prompt_lens) + 8 * 2
    assert s.real_tokens == sum(prompt_lens) + 1 + 8


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    first = llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], p, use_tqdm=False)[1].outputs[0].token_ids
    assert first == again
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(PROMPTS[0], other, use_tqdm=False)[0].outputs[0].token_ids != first


def test_top_k_of_one_is_greedy(llm) -> None:
    greedy = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    k1 = SamplingParams(temperature=0.8, top_k=1, seed=5, max_tokens=12, ignore_eos=True)
    assert llm.generate(PROMPTS[1], k1, use_tqdm=False)[0].outputs[0].token_ids == greedy


def test_stop_string_ends_the_output_before_it(llm) -> None:
    full = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.find(stop)]


def test_stop_token_id_ends_the_output_after_it(llm) -> None:
    ids = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[4]], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    first = ids.index(ids[4])
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop"


def test_eos_ends_the_output_unless_ignored_or_before_min_tokens(llm) -> None:
    ids = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.eos_token_id = ids[2]  # the third greedy token now plays end-of-sequence
    first = ids.index(ids[2])

    def run(**kw: object) -> object:
        return llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, **kw), use_tqdm=False)[
            0
        ].outputs[0]

    stopped = run()
    assert stopped.token_ids == ids[: first + 1] and stopped.finish_reason == "stop"
    assert run(ignore_eos=True).token_ids == ids
    held = run(min_tokens=8)
    assert len(held.token_ids) >= 8 and ids[2] not in held.token_ids[:8]


def test_chat_applies_the_template(llm) -> None:
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_abort_frees_kv_blocks_at_once(llm) -> None:
    engine = llm.engine
    engine.add_request("a", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request("a") and engine.abort_request("b")
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.abort_request("a")


def test_a_failing_batch_fails_only_its_requests(llm, monkeypatch) -> None:
    engine = llm.engine
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=4))
    with monkeypatch.context() as m:
        m.setattr(engine.runner, "execute", lambda batch: 1 / 0)
        outs = engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("bad", "error")]
    assert llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_step_stats_count_tokens_and_packed_batches_carry_no_padding(llm) -> None:
    llm.generate(
        ["a b", "The quick brown fox jumps over the lazy dog."], SamplingParams(max_tokens=2), use_tqdm=False
    )
    s = llm.engine.stats
    prompt_tokens = sum(
        len(llm.engine.tokenize(p)) for p in ["a b", "The quick brown fox jumps over the lazy dog."]
    )
    assert s.steps == 2 and s.real_tokens == prompt_tokens + 2
    assert s.padded_tokens == s.real_tokens and s.padding_ratio == 0


def test_each_step_record_keeps_the_shape_the_cost_model_charges(llm) -> None:
    prompts = ["a b", "The quick brown fox jumps over the lazy dog."]
    lens = [len(llm.engine.tokenize(p)) for p in prompts]
    llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    first, second = list(llm.engine.stats.recent)[-2:]
    # The prompts prefill from an empty cache, then each decodes after prompt + 1 tokens.
    assert sorted(first.shape.prefill) == sorted((n, 0) for n in lens) and first.shape.decode == ()
    assert second.shape.prefill == () and sorted(second.shape.decode) == sorted(n + 1 for n in lens)


def test_a_padded_batch_counts_its_padding() -> None:
    from bucketserve.core.scheduler import ScheduledBatch
    from bucketserve.core.sequence import Sequence

    seqs = [Sequence(str(i), [1] * n, SamplingParams()) for i, n in enumerate([3, 10, 1])]
    assert ScheduledBatch(seqs, [3, 10, 1], padded=True).num_padded_tokens == 2 * 10 + 1
    assert ScheduledBatch(seqs, [3, 10, 1]).num_padded_tokens == 14


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", SamplingParams(), "prompt is empty"),
        ("word " * 300, SamplingParams(max_tokens=4), "maximum context length is 256 tokens"),
        ("hi", SamplingParams(max_tokens=300), "maximum context length is 256 tokens"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_queued(llm, prompt, params, match) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([PROMPTS[0], prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_sampling_params_validate() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match=r"logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=21)


def test_kv_budget_too_small_says_how_much_is_needed(make_llm) -> None:
    # tiny model: 2 layers x 2 kv heads x 16 dims x 2 (K,V) x 4 bytes = 512 bytes per token
    with pytest.raises(ConfigError, match=r"at least 131072 bytes .*512 bytes per token"):
        make_llm(kv_cache_memory=1000)


def test_missing_model_path_is_a_clear_error(make_llm) -> None:
    from bucketserve import LLM

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM("/nonexistent/model")


def test_logprobs_are_the_models_log_softmax_at_each_output_position(llm, tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.logprobs is not None and [lp.token_id for lp in c.logprobs] == c.token_ids

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    ids = out.prompt_token_ids + c.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    for i, lp in enumerate(c.logprobs):
        expected = logp[len(out.prompt_token_ids) - 1 + i]
        assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=1e-3)
        top = torch.topk(expected, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_no_logprobs_unless_asked(llm) -> None:
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].logprobs is None
    zero = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0), use_tqdm=False
    )
    assert [lp.top for lp in zero[0].outputs[0].logprobs] == [(), (), ()]


def test_a_finished_output_gives_its_metrics_record(llm) -> None:
    from bucketserve.metrics import RequestRecord

    out = llm.generate("Hello", GREEDY, use_tqdm=False)[0]
    rec = RequestRecord.from_output(out)
    m = out.metrics
    assert rec.ttft == m.first_token_time - m.arrival_time > 0
    assert rec.e2e == m.finished_time - m.arrival_time >= rec.ttft
    assert (rec.prompt_tokens, rec.output_tokens) == (len(out.prompt_token_ids), 12)
    assert rec.queue_time is not None and 0 <= rec.queue_time <= rec.ttft


def test_a_finished_output_carries_the_slo_targets_it_was_scheduled_against(make_llm) -> None:
    """A request's own targets first, else its length class, else the defaults: what the
    server's SLO attainment is measured against."""
    from bucketserve.config import OrderConfig

    llm = make_llm(order=OrderConfig(slo_classes=("4:1:0.2",), default_ttft_slo_s=7.0))
    short, long_ = llm.generate(
        ["Hi", "The quick brown fox jumps over the lazy dog."], GREEDY, use_tqdm=False
    )
    assert len(short.prompt_token_ids) <= 4 < len(long_.prompt_token_ids)
    assert (short.metrics.ttft_slo, short.metrics.tpot_slo) == (1.0, 0.2)
    assert (long_.metrics.ttft_slo, long_.metrics.tpot_slo) == (7.0, None)


def test_with_reject_late_a_request_dropped_from_the_queue_ends_late_with_no_token(make_llm) -> None:
    """One seat, two requests with 1-ms TTFT targets, the cost model already knowing that a
    prompt takes far longer: the one left waiting is ended at the end of the first step, and
    the engine answers it (finish_reason "late", no token) while the other runs on."""
    from bucketserve.config import OrderConfig
    from bucketserve.core.cost import OnlineCostFit, Profile

    llm = make_llm(max_num_seqs=1, order=OrderConfig(reject_late=True))
    engine = llm.engine
    engine.add_request("a", "Hello there", SamplingParams(max_tokens=4), ttft_slo=0.001)
    engine.add_request("b", "Hello again", SamplingParams(max_tokens=4), ttft_slo=0.001)
    slow = Profile(prefill=(50.0, 1.0, 0.0), decode_small=(20.0, 0.0, 1.0), decode_large=(20.0, 0.0, 1.0))
    engine.scheduler.cost_fit = OnlineCostFit(prior=slow)
    outputs = {o.request_id: o for o in engine.step()}
    late = outputs["b"]
    assert late.finished and late.outputs[0].finish_reason == "late" and late.outputs[0].token_ids == []
    assert not outputs["a"].finished and engine.scheduler.num_late == 1
    while engine.has_unfinished_requests():
        engine.step()
