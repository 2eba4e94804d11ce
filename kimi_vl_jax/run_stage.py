"""Running one stage config in a workdir: the dispatch on `config.stage` and the `summary.json`
every run leaves behind. Shared by the single-stage entry point (`main.py`) and the recipe chain
(`recipe.py`); no command-line flags live here.
"""

from __future__ import annotations

import json

from absl import logging

from kimi_vl_jax.storage import paths as storage_paths

LM_STAGES = ('vit_align', 'joint_pretrain', 'joint_cooldown', 'long_context', 'joint_sft',
             'long_cot_sft')
# Stages the same loop runs with their own model, batches and loss (train/loop.py `stage_for`).
LOOP_STAGES = LM_STAGES + ('vit_pretrain',)


def check_workdir(config, workdir: str) -> None:
  """The RL trainer keeps its workdir (checkpoints, metrics, held-out records) on a local disk;
  the LM loop also takes s3:// and gs:// workdirs (train/loop.py)."""
  if config.stage == 'rl' and storage_paths.is_remote(workdir):
    raise ValueError(f'the rl stage writes a local workdir only (rl/trainer.py), got {workdir!r}; '
                     'its init_from may still be remote (orbax:s3://... / gs://...)')


def run(config, workdir: str) -> dict:
  """Dispatches on `config.stage`; returns the run summary."""
  check_workdir(config, workdir)
  from kimi_vl_jax.parallel import distributed
  distributed.maybe_initialize()
  if config.stage in LOOP_STAGES:
    from kimi_vl_jax.train.loop import Trainer
    return Trainer(config, workdir).run()
  if config.stage == 'rl':
    from kimi_vl_jax.rl.trainer import RLTrainer
    return RLTrainer(config, workdir).run()
  raise ValueError(f'config.stage={config.stage!r} is not a stage this entry point trains; '
                   f'known: {", ".join(LOOP_STAGES)}, rl')


def run_and_record(config, workdir: str) -> dict:
  """`run`, then print the summary and write it to `workdir/summary.json` (what `main` and the
  recipe chain, `kimi_vl_jax/recipe.py`, do for every stage)."""
  if config.get('jax_matmul_precision'):
    import jax
    jax.config.update('jax_default_matmul_precision', config.jax_matmul_precision)
  logging.info('stage %s, workdir %s', config.stage, workdir)
  summary = run(config, workdir)
  line = json.dumps({k: v for k, v in summary.items() if k != 'eval'}, default=str)
  print(f'run summary: {line}', flush=True)
  if summary.get('eval'):
    print('final eval: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in summary['eval'].items()), flush=True)
  storage_paths.write_text(storage_paths.join(workdir, 'summary.json'),
                           json.dumps(summary, indent=2, default=str))
  return summary
