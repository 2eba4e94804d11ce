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

from absl import app, flags, logging
from ml_collections import config_flags

from kimi_vl_jax.run_stage import LM_STAGES, LOOP_STAGES, run, run_and_record  # noqa: F401 (re-exported)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'stage config file[:variant]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, plots); '
                                'local, s3:// or gs://')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/joint_sft.py:tiny')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  run_and_record(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
