"""Prompt arrays -> response texts with the KV-cache sampler (kimi_vl_jax/sampling).

Prompts are generated in batches of similar length (sorted by length, so one batch's prompts pad
to the same bucket) and the texts returned in the callers' order.
"""

from __future__ import annotations

from typing import Callable

from kimi_vl_jax.evaluation.prompts import PromptArrays
from kimi_vl_jax.sampling import Prompt, Sampler, SamplingParams


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
  """smallest, 2 smallest, ... up to the first value >= largest (which ends the tuple as
  `largest`)."""
  out, b = [], smallest
  while b < largest:
    out.append(b)
    b *= 2
  return tuple(out) + (largest,)


def make_sampler(model, *, max_len: int, batch_size: int) -> Sampler:
  """A sampler over the model's whole evaluation length (`max_len`: prompt + new tokens)."""
  return Sampler(model.config, model.params, max_len=max_len,
                 prompt_buckets=power_of_two_buckets(min(64, max_len), max_len),
                 batch_buckets=power_of_two_buckets(1, batch_size), tokenizer=model.tokenizer)


def sampler_generate(sampler: Sampler, params: SamplingParams, batch_size: int,
                     on_batch: Callable[[int, int], None] | None = None
                     ) -> Callable[[list[PromptArrays]], list[str]]:
  """`generate(prompts) -> texts` (stop token stripped), `batch_size` prompts per call;
  `on_batch(done, total)` reports progress."""

  def generate(prompts: list[PromptArrays]) -> list[str]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      batch = [Prompt(input_ids=prompts[i].input_ids, pixel_values=prompts[i].pixel_values,
                      image_grid_hws=prompts[i].image_grid_hws) for i in idx]
      out = sampler.generate(batch, params)
      for i, text in zip(idx, out.texts, strict=True):
        texts[i] = text
      if on_batch is not None:
        on_batch(min(start + batch_size, len(order)), len(order))
    return texts

  return generate
