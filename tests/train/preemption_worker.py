"""One process of the multi-host preemption test: counts steps until `Preemption.reached`.

Usage: preemption_worker.py OUT_PREFIX. Writes OUT_PREFIX.<process>.progress (the last step) while
running and OUT_PREFIX.<process>.json ({process_count, stopped_at}) at the end.
"""

import json
import sys
import time

from kimi_vl_jax.parallel import distributed

distributed.maybe_initialize()

import jax  # noqa: E402

from kimi_vl_jax.train.preemption import Preemption  # noqa: E402


def main(prefix: str) -> None:
  me = jax.process_index()
  stopped = None
  with Preemption() as preemption:
    for step in range(1, 3001):
      time.sleep(0.02)  # a train step
      with open(f'{prefix}.{me}.progress', 'w') as f:
        f.write(str(step))
      if preemption.reached(step):
        stopped = step
        break
  with open(f'{prefix}.{me}.json', 'w') as f:
    json.dump({'process_count': jax.process_count(), 'stopped_at': stopped}, f)


if __name__ == '__main__':
  main(sys.argv[1])
