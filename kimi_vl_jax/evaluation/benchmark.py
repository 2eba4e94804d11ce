"""Scoring a benchmark file: chats whose last turn is the reference answer, generation for the
rest of each chat, one offline scorer per record (evaluation/scorers.py).

A record is a JSONL line in the messages format (data/chat.py) plus its scorer's fields; images
are paths relative to the file's directory. The file may be local, `s3://` or `gs://`
(storage/jsonl.py: read through the read cache; a bad line stops the run with its number).
Accuracy is reported overall, per scorer and per `task` when records carry one (e.g.
`mmmu_val`), as `accuracy`, `accuracy/<scorer>`, `accuracy/task/<task>`.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

from kimi_vl_jax.data import chat
from kimi_vl_jax.evaluation import prompts, scorers
from kimi_vl_jax.storage import jsonl
from kimi_vl_jax.storage import paths as storage_paths


def load_records(path: str, limit: int | None = None) -> list[dict]:
  """The file's records (`_line`: the 1-based line number), checked to end in an assistant turn
  and to name a scorer or leave it to the caller's override."""
  def parse(record: dict, line: int) -> dict:
    if chat.parse_conversation(record)[-1].role != 'assistant':
      raise ValueError('the last turn must be the reference answer (role assistant)')
    record['_line'] = line
    return record
  return jsonl.read(path, parse, limit=limit, errors=(chat.SkipExample,), what='benchmark file')


def split_reference(record: dict) -> tuple[list[dict], str]:
  """(the chat without its last turn, the reference answer's text)."""
  last = record['messages'][-1]
  content = last['content']
  if isinstance(content, list):
    content = ''.join(p if isinstance(p, str) else p.get('text', '') for p in content)
  return record['messages'][:-1], content


def evaluate(records: Sequence[dict], generate: Callable[[list[prompts.PromptArrays]], list[str]],
             tok, image_cfg, *, root: str, scorer: str | None = None,
             system_prompt: str | None = None) -> tuple[dict[str, float], list[dict]]:
  """(metrics, one row per record with its prediction and score)."""
  names = [scorers.scorer_name(r, scorer) for r in records]   # fail before generating
  built = [prompts.build_prompt(split_reference(r)[0], tok, image_cfg, root=root,
                                system_prompt=system_prompt) for r in records]
  texts = generate(built)
  if len(texts) != len(records):
    raise ValueError(f'generate returned {len(texts)} texts for {len(records)} prompts')
  rows, groups = [], collections.defaultdict(list)
  for r, name, text in zip(records, names, texts):
    reference = split_reference(r)[1]
    s = scorers.SCORERS[name](text, reference, r)
    rows.append({'line': r['_line'], 'id': r.get('id'), 'task': r.get('task'), 'scorer': name,
                 'reference': reference, 'prediction': text, 'score': s})
    groups['accuracy'].append(s)
    groups[f'accuracy/{name}'].append(s)
    if isinstance(r.get('task'), str):
      groups[f'accuracy/task/{r["task"]}'].append(s)
  metrics = {k: sum(v) / len(v) for k, v in groups.items()}
  metrics['examples'] = len(rows)
  return metrics, rows


def file_root(path: str) -> str:
  """The directory the file's image paths are relative to (local or remote)."""
  return storage_paths.dirname(path)
