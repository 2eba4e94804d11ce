"""The `rl` section of an RL stage config (`configs/rl.py`), read and checked once at start."""

from __future__ import annotations

import dataclasses
from typing import Any

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.rl import rewards
from kimi_vl_jax.rl.length_penalty import LengthPenaltyConfig
from kimi_vl_jax.rl.mirror_descent import MirrorDescentConfig
from kimi_vl_jax.rl.prompt_selection import Curriculum

FIELDS = {
    # prompt sets (rl/rollouts.py) and the verifier of records that name none
    'prompts': None, 'prompt_limit': None, 'heldout': None, 'heldout_examples': 200,
    'heldout_samples': 4, 'eval_every': 5, 'verifier': 'numeric',
    # iterations and rollouts
    'iterations': 10, 'prompts_per_iteration': 8, 'k': 8, 'temperature': 0.8, 'top_p': 1.0,
    'top_k': 0, 'segment_tokens': 256, 'max_segments': 2, 'max_len': 1024,
    'length_buckets': (128, 256, 512, 1024), 'batch_buckets': (1, 8, 64),
    # the update (rl/mirror_descent.py, rl/policy_step.py)
    'tau': 0.01, 'baseline': 'mean', 'length_normalise': False, 'groups_per_step': 4,
    'epochs': 1, 'grad_accum': 1, 'reset_optimizer': False, 'kl_to_start': True,
    'skip_uniform_groups': False,
    # rewards beyond the answer (rl/length_penalty.py, rl/rewards.py)
    'length_penalty': {}, 'loop_penalty': {},
    # prompt selection (rl/prompt_selection.py): ((first_iteration, max_difficulty), ...)
    'curriculum': (), 'priority_floor': 0.0, 'drop_solved_samples': 0,
}


@dataclasses.dataclass(frozen=True)
class RLConfig:
  prompts: str
  prompt_limit: int | None
  heldout: str
  heldout_examples: int
  heldout_samples: int
  eval_every: int
  verifier: str
  iterations: int
  prompts_per_iteration: int
  k: int
  temperature: float
  top_p: float
  top_k: int
  segment_tokens: int
  max_segments: int
  max_len: int
  length_buckets: tuple[int, ...]
  batch_buckets: tuple[int, ...]
  mirror_descent: MirrorDescentConfig
  groups_per_step: int
  epochs: int
  grad_accum: int
  reset_optimizer: bool
  kl_to_start: bool
  skip_uniform_groups: bool
  length_penalty: LengthPenaltyConfig
  loop_penalty: rewards.LoopPenaltyConfig
  curriculum: Curriculum
  priority_floor: float
  drop_solved_samples: int

  @classmethod
  def from_config(cls, section: Any) -> 'RLConfig':
    d = as_dict(section)
    unknown = set(d) - set(FIELDS)
    if unknown:
      raise ValueError(f'unknown rl config fields {sorted(unknown)}; known: {sorted(FIELDS)}')
    v = {**FIELDS, **{k: x for k, x in d.items() if x is not None or FIELDS[k] is None}}
    for name in ('prompts', 'heldout'):
      if not v[name]:
        raise ValueError(f'rl.{name} must name a prompt set (JSONL of chat records)')
    if v['verifier'] not in rewards.KINDS:
      raise ValueError(f'rl.verifier={v["verifier"]!r}: one of {rewards.KINDS}')
    ints = ('heldout_examples', 'heldout_samples', 'eval_every', 'iterations',
            'prompts_per_iteration', 'k', 'segment_tokens', 'max_segments', 'max_len',
            'groups_per_step', 'epochs', 'grad_accum')
    for name in ints:
      if int(v[name]) < 1:
        raise ValueError(f'rl.{name} must be >= 1, got {v[name]}')
    if v['k'] < 2:
      raise ValueError('rl.k must be >= 2: the baseline compares a prompt\'s responses')
    if (v['groups_per_step'] * v['k']) % v['grad_accum']:
      raise ValueError('rl.grad_accum must divide groups_per_step * k rows')
    if (v['groups_per_step'] * v['k'] // v['grad_accum']) % v['k']:
      raise ValueError('each micro-batch must hold whole groups: groups_per_step must be a '
                       'multiple of grad_accum')
    if not 0 < float(v['top_p']) <= 1 or float(v['temperature']) <= 0:
      raise ValueError('rl.temperature must be > 0 and 0 < rl.top_p <= 1 (RL samples)')
    curriculum = tuple(tuple(int(x) for x in s) for s in v['curriculum'])
    return cls(
        prompts=str(v['prompts']), prompt_limit=(None if v['prompt_limit'] is None else
                                                 int(v['prompt_limit'])),
        heldout=str(v['heldout']), heldout_examples=int(v['heldout_examples']),
        heldout_samples=int(v['heldout_samples']), eval_every=int(v['eval_every']),
        verifier=str(v['verifier']), iterations=int(v['iterations']),
        prompts_per_iteration=int(v['prompts_per_iteration']), k=int(v['k']),
        temperature=float(v['temperature']), top_p=float(v['top_p']), top_k=int(v['top_k']),
        segment_tokens=int(v['segment_tokens']), max_segments=int(v['max_segments']),
        max_len=int(v['max_len']), length_buckets=tuple(int(x) for x in v['length_buckets']),
        batch_buckets=tuple(int(x) for x in v['batch_buckets']),
        mirror_descent=MirrorDescentConfig(tau=float(v['tau']), baseline=str(v['baseline']),
                                           length_normalise=bool(v['length_normalise'])),
        groups_per_step=int(v['groups_per_step']), epochs=int(v['epochs']),
        grad_accum=int(v['grad_accum']), reset_optimizer=bool(v['reset_optimizer']),
        kl_to_start=bool(v['kl_to_start']), skip_uniform_groups=bool(v['skip_uniform_groups']),
        length_penalty=LengthPenaltyConfig(**as_dict(v['length_penalty'])),
        loop_penalty=rewards.LoopPenaltyConfig(**as_dict(v['loop_penalty'])),
        curriculum=Curriculum(curriculum), priority_floor=float(v['priority_floor']),
        drop_solved_samples=int(v['drop_solved_samples']))
