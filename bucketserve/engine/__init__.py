"""The torch side: model, weights, KV cache, sampler, model runner and the engine loop."""
