"""Each linear's activation range per input channel, measured once at start-up, for the
smoothing of the w8a8 weight format (SmoothQuant, Xiao et al., ICML 2023).

w8a8 quantizes a step's activations to int8 with one scale per token (weights.py). A few
input channels of a transformer's activations carry outliers tens of times larger than the
rest, and one scale per token then rounds the small channels away: on SmolLM2-135M, w8a8 on
every linear raised the perplexity of 20 ShareGPT replies by 4.1% over bf16. SmoothQuant
moves part of each channel's range into the weights, ``x / s`` and ``W * s`` with
``s_j = max|x_j|^a / max|W_j|^(1-a)``: the product is unchanged, the activations flatter
(the same measurement: +1.7% at a = 0.5; ``weights.smoothing``). The division by ``s``
happens inside the quantization call, so the other formats keep the weights as they are.

The same text decides where ``--quantization auto`` lets prompt tokens run w8a8: a second pass
measures each decoder linear's w8a8 output against its exact one (``record_prompt_w8a8_errors``,
``weights.PROMPT_W8A8_TOLERANCE``).

The ranges come from one forward pass over ``CALIBRATION_TEXT`` (prose, a dialogue, code,
lists and numbers: 442 tokens for the embedded model, its pass 0.65 s on the 2-core Xeon).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bucketserve.engine.kv_cache import allocate_kv_cache
from bucketserve.engine.model import AttentionMetadata, LlamaModel
from bucketserve.engine.weights import MultiFormatLinear

CALIBRATION_TEXT = """\
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
Can you explain how a refrigerator keeps food cold, in simple terms?<|im_end|>
<|im_start|>assistant
Sure! A refrigerator moves heat from the inside to the outside. A liquid called the
refrigerant flows through pipes. Inside the fridge it evaporates and absorbs heat, which
cools the air; a compressor then squeezes the gas, and the coils at the back release that
heat into the kitchen. The cycle repeats, so the inside stays at about 4 degrees Celsius.<|im_end|>
<|im_start|>user
Write a Python function that returns the n-th Fibonacci number.<|im_end|>
<|im_start|>assistant
```python
def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
```
For example, fibonacci(10) returns 55.<|im_end|>
The history of the city begins in 1743, when traders built a small port on the river. By
1850 its population had reached 120,000, and the railway of 1867 made it the region's
largest market. Today it is known for its universities, its museums and its harbour.
Ingredients: 2 cups of flour, 1 teaspoon of salt, 3 eggs, 250 ml of milk.
1. Mix the flour and the salt. 2. Beat in the eggs. 3. Add the milk slowly and stir.
Q: What is the capital of France? A: The capital of France is Paris.
Les enfants jouent dans le jardin pendant que leurs parents préparent le dîner.
Dear Ms. Smith, thank you for your letter of 12 March; I am pleased to confirm the meeting.
SELECT name, COUNT(*) FROM orders WHERE total > 100 GROUP BY name ORDER BY 2 DESC;
"""


@torch.inference_mode()
def record_input_ranges(model: LlamaModel, token_ids: list[int], block_size: int = 16) -> None:
    """Run ``token_ids`` through ``model`` (as one prefill, into a scratch KV cache) and set
    each linear's ``input_absmax``: the largest magnitude each input channel took."""
    linears = [*(lin for layer in model.linears() for lin in layer), model.lm_head]
    ranges: dict[MultiFormatLinear, torch.Tensor] = {}

    def record(lin: MultiFormatLinear, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        seen = inputs[0].detach().float().abs().amax(0)
        ranges[lin] = seen if lin not in ranges else torch.maximum(ranges[lin], seen)

    _prefill_with_hooks(model, token_ids, block_size, linears, record)
    for lin in linears:
        lin.input_absmax = ranges[lin]


@torch.inference_mode()
def record_prompt_w8a8_errors(model: LlamaModel, token_ids: list[int], block_size: int = 16) -> None:
    """Set each decoder linear's ``prompt_w8a8_error``: w8a8's relative error on the inputs it
    sees for ``token_ids`` (after ``record_input_ranges``, whose ranges w8a8 smooths by). The
    linears must be unpacked (exact), so that each sees the exact model's activations."""
    linears = [lin for layer in model.linears() for lin in layer]

    def record(lin: MultiFormatLinear, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        lin.prompt_w8a8_error = lin.w8a8_error(inputs[0])

    _prefill_with_hooks(model, token_ids, block_size, linears, record)


def _prefill_with_hooks(
    model: LlamaModel,
    token_ids: list[int],
    block_size: int,
    linears: list[MultiFormatLinear],
    hook: Callable[[MultiFormatLinear, tuple[torch.Tensor, ...], torch.Tensor], None],
) -> None:
    handles = [lin.register_forward_hook(hook) for lin in linears]
    try:
        n = len(token_ids)
        param = model.lm_head.weight
        kv = allocate_kv_cache(model.args, n // block_size + 1, block_size, param.dtype, param.device)
        meta = AttentionMetadata.one_prefill(n)
        model(torch.tensor(token_ids), meta.positions, kv, meta, torch.arange(n))
    finally:
        for h in handles:
            h.remove()
