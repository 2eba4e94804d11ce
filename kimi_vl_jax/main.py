"""Entry point: train one Kimi-VL stage from its config.

    python -m kimi_vl_jax.main --config=configs/joint_sft.py:tiny --workdir=/tmp/kimi_vl_tiny
    python -m kimi_vl_jax.main --config=configs/joint_sft.py --workdir=gs://bucket/run \\
        --config.init_from=orbax:gs://bucket/long_context

`--config=FILE[:ARG]` names a stage config (`get_config(ARG)`; ARG '' = the full Kimi-VL-A3B,
'tiny' = the CPU variant); `--config.a.b=v` overrides single fields. The config's `stage` picks
what runs; every language-model stage (joint pre-training, cooldown, long context, joint SFT,
long-CoT SFT) runs the shared loop `train.loop.Trainer`, which first checks the parallel config
against the devices and the model (`parallel.mesh.validate`: a bad one stops here, before anything
compiles, naming the field to change). Re-running the same command resumes from the newest
complete checkpoint in the workdir. On SIGTERM (TPU maintenance, spot VMs) the run saves a
checkpoint at the current step and exits with status 0 (`summary.json` has `preempted_at`); the
same command resumes it.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from kimi_vl_jax.storage import paths as storage_paths

_CONFIG = config_flags.DEFINE_config_file('config', None, 'stage config file[:variant]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, plots); '
                                'local, s3:// or gs://')

LM_STAGES = ('vit_align', 'joint_pretrain', 'joint_cooldown', 'long_context', 'joint_sft',
             'long_cot_sft')
# Stages the same loop runs with their own model, batches and loss (train/loop.py `stage_for`).
LOOP_STAGES = LM_STAGES + ('vit_pretrain',)


def run(config, workdir: str) -> dict:
  """Dispatches on `config.stage`; returns the run summary."""
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/joint_sft.py:tiny')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  config = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if config.get('jax_matmul_precision'):
    import jax
    jax.config.update('jax_default_matmul_precision', config.jax_matmul_precision)
  logging.info('stage %s, workdir %s', config.stage, _WORKDIR.value)
  summary = run(config, _WORKDIR.value)
  line = json.dumps({k: v for k, v in summary.items() if k != 'eval'}, default=str)
  print(f'run summary: {line}', flush=True)
  if summary.get('eval'):
    print('final eval: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in summary['eval'].items()), flush=True)
  storage_paths.write_text(storage_paths.join(_WORKDIR.value, 'summary.json'),
                           json.dumps(summary, indent=2, default=str))


if __name__ == '__main__':
  app.run(main)
