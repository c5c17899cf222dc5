"""The discrete-event simulator: the core's policies, unchanged, on simulated GPUs.

``simulator`` (event loop, instances, records), ``cost_model`` (profiled step latency, KV
capacity, KV transfer), ``experiments`` and ``report`` (the paper's experiments, trace
replays), ``validate`` (replaying bench runs), ``profile`` (measuring our engine), ``cli``.
Pure Python except ``profile``, which loads the engine.
"""
