"""RL prompt sets and the rollouts -> train-batch conversion.

A prompt set is a JSONL file of chat records (`data/chat.py` format): the conversation up to the
question, optionally followed by an assistant turn with a reference solution, and

  answer      the reference final answer (default: the text of the trailing assistant turn)
  verifier    one of `rl/rewards.py` KINDS (default: the config's)
  options     the option texts of a multiple-choice question
  difficulty  an int label for the curriculum (default 0)
  kind        a free label (reported per kind)

Images named by a record are resolved against the file's directory, which they must not leave.
The file (and so its images) may be local, `s3://` or `gs://` (storage/jsonl.py, through the read
cache). A malformed record stops the run at start with its line number: a prompt set is
configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kimi_vl_jax.data import chat, images as images_lib
from kimi_vl_jax.data.build_demo import resolve_path
from kimi_vl_jax.data.sources import resolve_under_root
from kimi_vl_jax.rl import partial_rollouts, rewards
from kimi_vl_jax.sampling.prompts import (Prompt, bucket, parse_messages, prefill_batch,
                                          render_messages)
from kimi_vl_jax.storage import jsonl
from kimi_vl_jax.storage import paths as storage_paths


@dataclasses.dataclass
class PromptRecord:
  prompt: Prompt
  answer: str
  verifier: str
  options: tuple[str, ...] = ()
  difficulty: int = 0
  kind: str | None = None


def load_prompts(path: str, tokenizer, *, verifier: str, limit: int | None = None,
                 image_config: images_lib.ImageConfig | None = None,
                 system_prompt: str | None = None) -> list[PromptRecord]:
  """The prompt set at `path` (`demo:` paths are built on first use); see the module docstring."""
  path = resolve_path(path)
  root = storage_paths.dirname(path)
  return jsonl.read(
      path, lambda rec, _: _record(rec, tokenizer, root, verifier, image_config, system_prompt),
      limit=limit, errors=(KeyError, TypeError, chat.SkipExample, images_lib.BadImage),
      what='prompt set')


def _record(rec: dict, tokenizer, root: str, default_verifier: str, image_config,
            system_prompt) -> PromptRecord:
  messages = list(rec['messages'])
  answer = rec.get('answer')
  if messages and messages[-1].get('role') == 'assistant':
    last = messages.pop()
    if answer is None:
      content = last['content']
      answer = content if isinstance(content, str) else ''.join(
          p.get('text', '') for p in content if isinstance(p, dict))
  if answer is None or not str(answer).strip():
    raise ValueError('a prompt record needs an `answer` (or a trailing assistant turn)')
  for ref in chat.image_refs(parse_messages(messages)):   # must stay inside the set's directory
    resolve_under_root(root, ref)
  verifier = rec.get('verifier', default_verifier)
  if verifier not in rewards.KINDS:
    raise ValueError(f'verifier {verifier!r}: one of {rewards.KINDS}')
  options = tuple(rec.get('options', ()))
  if verifier == 'choice' and not options:
    raise ValueError('a multiple-choice prompt needs `options`')
  prompt = render_messages(messages, tokenizer, image_root=root, image_config=image_config,
                           default_system_prompt=system_prompt)
  return PromptRecord(prompt, str(answer), verifier, options, int(rec.get('difficulty', 0)),
                      rec.get('kind'))


def continuation(record: PromptRecord, response: partial_rollouts.Response) -> Prompt:
  """The prompt that continues a partial response: its prompt followed by the tokens so far."""
  return Prompt(np.concatenate([record.prompt.input_ids,
                                np.asarray(response.tokens, np.int32)]),
                record.prompt.pixel_values, record.prompt.image_grid_hws)


def train_batch(rows: Sequence[tuple[PromptRecord, partial_rollouts.Response, float]],
                iteration: int, num_rows: int, length_buckets: Sequence[int], config
                ) -> dict[str, np.ndarray]:
  """Rollouts -> an RL batch (`rl/policy_step.py`): row r is (prompt, response, reward), a
  group's k rows consecutive; rows past `len(rows)` are padding (valid 0). The response tokens
  this iteration sampled are the loss tokens."""
  if len(rows) > num_rows:
    raise ValueError(f'{len(rows)} responses for {num_rows} rows')
  seqs = [continuation(rec, resp) for rec, resp, _ in rows]
  T = bucket(max(len(s.input_ids) for s in seqs), length_buckets, what='rollout length')
  batch = prefill_batch(seqs, num_rows, T, config)
  lengths = batch.pop('lengths')
  ids = batch['input_ids']
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  targets = np.where(np.arange(T)[None] < lengths[:, None] - 1, targets, 0)
  loss_mask = np.zeros(ids.shape, np.float32)
  rewards_ = np.zeros(num_rows, np.float32)
  valid = np.zeros(num_rows, np.float32)
  for r, (rec, resp, reward) in enumerate(rows):
    p = len(rec.prompt.input_ids)
    # Position t predicts token t + 1: response token j sits at p + j, predicted at p + j - 1.
    loss_mask[r, p - 1:p - 1 + len(resp.tokens)] = partial_rollouts.loss_mask(resp, iteration)
    rewards_[r], valid[r] = reward, 1.0
  batch.update(targets=targets.astype(np.int32), loss_mask=loss_mask, rewards=rewards_,
               valid=valid, old_logp=np.zeros(ids.shape, np.float32))
  return batch
