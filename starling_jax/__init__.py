"""starling_jax: the Starling-7B RLAIF pipeline (Nectar K-wise reward models, PPO/APA) in JAX."""

__version__ = "0.1.0"
