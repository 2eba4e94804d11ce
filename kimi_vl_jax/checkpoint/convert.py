"""Convert between an HF Kimi-VL directory and an orbax parameter checkpoint.

    python -m kimi_vl_jax.checkpoint.convert --hf_dir=Kimi-VL-A3B-Instruct --orbax_dir=/ckpt/a3b
    python -m kimi_vl_jax.checkpoint.convert --orbax_dir=/ckpt/a3b --hf_dir=out --direction=to_hf

The orbax side is a directory with `params/` (an orbax StandardCheckpointer tree in the layout of
docs/param_tree.md) and `config.json` (HF form), which `init_from='params:DIR'` in a training config
reads. Both sides may be `s3://` / `gs://` URLs: orbax writes and reads a local staging copy
(kimi_vl_jax/storage/mirror.py says why), uploaded with `config.json` last.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from kimi_vl_jax.checkpoint import hf
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.storage import files as storage_files
from kimi_vl_jax.storage import paths as storage_paths

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'HF checkpoint directory')
_ORBAX_DIR = flags.DEFINE_string('orbax_dir', None, 'orbax parameter checkpoint directory')
_DIRECTION = flags.DEFINE_enum('direction', 'to_orbax', ['to_orbax', 'to_hf'], 'which way')
_DTYPE = flags.DEFINE_string('dtype', None, 'parameter dtype to write (default: unchanged)')


def save_params(config: KimiVLConfig, params, directory: str) -> None:
  """Writes params (any pytree of arrays) with orbax, plus the config as HF config.json."""
  if storage_paths.is_remote(directory):
    storage_paths.check_bucket(directory, 'save_params')
    local = storage_files.staging_dir(directory, 'params')
    shutil.rmtree(local, ignore_errors=True)
    save_params(config, params, local)
    storage_paths.remove(directory)
    storage_files.publish_tree(local, directory, marker=None)
    return
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, 'params'), params, force=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config_lib.to_hf_dict(config), f, indent=2)


def load_params(directory: str, abstract_params=None) -> tuple[KimiVLConfig, dict]:
  """Reads what `save_params` wrote. `abstract_params` (ShapeDtypeStructs with shardings) places
  the arrays on a mesh; without it arrays are restored as saved, on the default device."""
  if storage_paths.is_remote(directory):
    directory = storage_files.fetch_tree(directory, 'params')
  directory = os.path.abspath(directory)
  config = config_lib.from_hf_json(os.path.join(directory, 'config.json'))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, 'params'), abstract_params)
  return config, params


def main(argv):
  del argv
  if not _HF_DIR.value or not _ORBAX_DIR.value:
    raise app.UsageError('both --hf_dir and --orbax_dir are required')
  if _DIRECTION.value == 'to_orbax':
    config, params = hf.load(_HF_DIR.value, dtype=_DTYPE.value)
    n = sum(x.size for x in jax.tree.leaves(params))
    logging.info('read %d parameters from %s', n, _HF_DIR.value)
    save_params(config, params, _ORBAX_DIR.value)
    print(f'wrote {n:,d} parameters to {_ORBAX_DIR.value}')
  else:
    config, params = load_params(_ORBAX_DIR.value)
    params = jax.tree.map(np.asarray, params)
    hf.save(config, params, _HF_DIR.value, dtype=_DTYPE.value)
    print(f'wrote HF checkpoint to {_HF_DIR.value}')


if __name__ == '__main__':
  app.run(main)
