"""Real-world workloads for benchmarks (pure Python, no torch)."""
