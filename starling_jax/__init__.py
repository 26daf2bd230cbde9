"""starling_jax: the Starling-7B RLAIF pipeline (Nectar K-wise reward models, PPO/APA) in JAX."""

import os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized schedule: ~5% faster CPU train steps here (interleaved A/B of the reward-model
# step, BENCHMARKS.md "Train step vs PyTorch"). A CPU-backend flag (TPU and GPU ignore it), added only when
# XLA_FLAGS does not mention it already, and read when JAX first creates its CPU client, i.e. it takes effect
# when starling_jax is imported before anything runs on JAX's CPU backend.
_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_FLAG}=true".strip()
