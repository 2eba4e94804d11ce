"""A module fixture's work done once per test session, shared by the xdist workers.

pytest-xdist's `xdist_group` does not keep a group on one worker under pytest 9.2 (pytest-xdist
3.8), so a module-scoped fixture whose tests land on both workers would run twice. `once` runs
`make(directory)` under a file lock in the session's temporary directory; the other workers wait
for it and load its pickled result.
"""

import fcntl
import os
import pickle


def once(tmp_path_factory, name: str, make):
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base   # the session's dir
  with open(shared / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = shared / f'{name}.pkl'
    if not done.exists():
      data = make(shared / name)
      with open(shared / f'{name}.pkl.tmp', 'wb') as f:
        pickle.dump(data, f)
      os.replace(shared / f'{name}.pkl.tmp', done)
    with open(done, 'rb') as f:
      return pickle.load(f)
