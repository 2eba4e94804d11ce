"""One process of the localhost multi-host `hf.load` test (run by test_multihost.py).

Loads the HF checkpoint in HF_DIR into the tiny model's 'fsdp' shardings over a 'data' mesh that
spans every process, counting what this process reads, and checks this process's shards of every
parameter against a host load (the processes together check every shard). Writes
OUT_PREFIX.<process index>.json.

    python hf_load_worker.py HF_DIR OUT_PREFIX   # env: JAX_COORDINATOR_ADDRESS, ... (or none)
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kimi_vl_jax.parallel import distributed  # noqa: E402


def main(hf_dir: str, out_prefix: str) -> None:
  distributed.maybe_initialize()
  from kimi_vl_jax.checkpoint import hf, hf_mapping
  from kimi_vl_jax.model.config import tiny
  from kimi_vl_jax.model.kimi_vl import init_params
  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.parallel import rules as rules_lib

  par = mesh_lib.default_config()
  par.rules = 'fsdp'
  mesh = mesh_lib.make_mesh(par)
  abstract = jax.eval_shape(lambda: init_params(tiny(), jax.random.key(0)))
  shardings = rules_lib.param_shardings(abstract, mesh, par.rules)
  stats = hf.ReadStats()
  _, params = hf.load(hf_dir, shardings=shardings, stats=stats)
  _, ref = hf.load(hf_dir)

  flat, ref = hf_mapping.flatten(params), hf_mapping.flatten(ref)
  local_equal = all(np.array_equal(np.asarray(s.data), ref[p][s.index])
                    for p, x in flat.items() for s in x.addressable_shards)
  result = {
      'process_count': jax.process_count(), 'device_count': jax.device_count(),
      'bytes_read': stats.bytes_read, 'bytes_by_param': stats.bytes_by_param,
      'param_bytes': {'/'.join(p): int(x.nbytes) for p, x in ref.items()},
      'spans_processes': {'/'.join(p): len(x.addressable_shards) < len(x.sharding.device_set)
                          and not x.sharding.is_fully_replicated for p, x in flat.items()},
      'local_equal': bool(local_equal),
  }
  with open(f'{out_prefix}.{jax.process_index()}.json', 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
