"""Evaluation: offline answer scorers (MMMU, OCRBench, MathVista, `\\boxed{}`), benchmark scoring
with the sampler and needle-in-a-haystack recall (`python -m kimi_vl_jax.eval`)."""
