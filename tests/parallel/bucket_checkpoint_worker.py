"""One process of the two-process bucket checkpoint test (run by test_multihost.py, not by
pytest itself): train checkpoints on `gs://` written by every process directly (no staging),
with the arrays sharded over both processes and a data-iterator position per process; then a
new manager (a restart) restores them. Writes what it saw to OUT as JSON.

    python bucket_checkpoint_worker.py OUT URL   # env: JAX_COORDINATOR_ADDRESS, ..., the emulator

(OUT.<process index>.json per process.)
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kimi_vl_jax.parallel import distributed  # noqa: E402


class _It:
  def __init__(self, pos):
    self.pos = pos

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, s):
    self.pos = s['pos']


def main(out_path: str, url: str) -> None:
  distributed.maybe_initialize()
  from kimi_vl_jax.train import checkpointing
  pid = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)

  def state(k):
    w = jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx] * k)
    return {'w': w, 'step': jax.device_put(jnp.asarray(k, jnp.int32), replicated)}

  mgr = checkpointing.make_manager(url, interval=1, keep=2)
  kind = type(mgr).__name__
  for k in (1, 2, 3):
    checkpointing.save(mgr, k, state(k), _It(100 * k + pid), {'phase': 0})
  mgr.wait_until_finished()
  mgr.close()

  mgr = checkpointing.make_manager(url, interval=1, keep=2)   # a restart
  latest = checkpointing.latest_step(mgr)
  abstract = {'w': jax.ShapeDtypeStruct(full.shape, jnp.float32, sharding=sharding),
              'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  it = _It(-1)
  got = checkpointing.restore(mgr, latest, abstract, it)
  shards_ok = all(np.array_equal(np.asarray(s.data), full[s.index] * latest)
                  for s in got['w'].addressable_shards)
  with open(f'{out_path}.{pid}.json', 'w') as f:
    json.dump({'manager': kind, 'location': checkpointing.location(mgr),
               'all_steps': [int(s) for s in mgr.all_steps()], 'latest': latest,
               'step': int(got['step']), 'shards_ok': bool(shards_ok),
               'local_shards': len(got['w'].addressable_shards), 'iterator_pos': it.pos,
               'meta': checkpointing.restore_meta(mgr, latest)}, f)
  mgr.close()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
