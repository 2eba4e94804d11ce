"""kimi_vl_jax: Kimi-VL training in JAX/Flax."""
