"""One process of the localhost multi-host test (run by test_multihost.py, not by pytest itself).

Trains the tiny KimiVL for a few AdamW steps on a ('data', 'expert') mesh spanning every process,
each process feeding only its own rows of the global batch; saves an orbax checkpoint, restores it
into freshly allocated sharded buffers and continues. Process 0 writes the losses and a parameter
checksum to OUT as JSON. With one process (and as many local devices) it is the reference run.

    python multihost_worker.py OUT WORKDIR        # env: JAX_COORDINATOR_ADDRESS, ... (or none)
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from kimi_vl_jax.parallel import distributed  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS_BEFORE, STEPS_AFTER = 8, 16, 3, 2


def global_batch(step: int, vocab: int) -> dict[str, np.ndarray]:
  """The same deterministic global batch on every process (each then keeps its own rows); two
  batches alternate so that a few steps visibly lower the loss."""
  rng = np.random.default_rng(1000 + step % 2)
  ids = rng.integers(0, vocab - 1, (GLOBAL_BATCH, SEQ + 1)).astype(np.int32)
  seg = np.ones((GLOBAL_BATCH, SEQ), np.int32)
  seg[:, SEQ // 2:] = 2                                   # two packed examples per row
  pos = np.concatenate([np.arange(SEQ // 2)] * 2)[None].repeat(GLOBAL_BATCH, 0).astype(np.int32)
  return {'input_ids': ids[:, :-1], 'targets': ids[:, 1:], 'segment_ids': seg, 'positions': pos}


def main(out_path: str, workdir: str) -> None:
  distributed.maybe_initialize()
  jax.config.update('jax_default_matmul_precision', 'highest')
  from kimi_vl_jax.model.config import tiny
  from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.parallel import rules as rules_lib
  from kimi_vl_jax.parallel.kernels import build_kernels

  pid, nproc = jax.process_index(), jax.process_count()
  par = mesh_lib.default_config()
  par.expert, par.rules = 2, 'dp_ep'
  mc = tiny()
  mesh_lib.check(par, num_devices=jax.device_count(), global_batch=GLOBAL_BATCH, seq_len=SEQ,
                 num_experts=mc.text.n_routed_experts, num_processes=nproc)
  mesh = mesh_lib.make_mesh(par)
  rules = rules_lib.get_rules(par.rules)
  model = KimiVL(mc, kernels=build_kernels(mc, mesh, rules))
  tx = optax.adamw(1e-2, weight_decay=0.01)

  abstract_boxed = jax.eval_shape(lambda: init_params(mc, jax.random.key(0), with_images=False))
  p_sh = rules_lib.param_shardings(abstract_boxed, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, nn.meta.unbox(abstract_boxed))
  o_sh = rules_lib.opt_state_shardings(abstract_opt, abstract_boxed, mesh, rules)
  b_sh = rules_lib.batch_sharding(mesh, rules)

  def init():
    p = nn.meta.unbox(init_params(mc, jax.random.key(0), with_images=False))
    return p, tx.init(p)

  def step(p, o, batch):
    def loss_fn(p):
      logits = model.apply({'params': p}, batch['input_ids'], positions=batch['positions'],
                           segment_ids=batch['segment_ids'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch['targets'])
      return ce.mean()
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  with rules_lib.sharding_context(mesh, rules):
    params, opt = jax.jit(init, out_shardings=(p_sh, o_sh))()
    train = jax.jit(step, in_shardings=(p_sh, o_sh, {k: b_sh for k in global_batch(0, 8)}),
                    out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))

  def run(params, opt, first, n):
    losses = []
    for s in range(first, first + n):
      full = global_batch(s, mc.text.vocab_size)
      rows = GLOBAL_BATCH // nproc
      mine = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
      with rules_lib.sharding_context(mesh, rules):
        params, opt, loss = train(params, opt, rules_lib.shard_batch(mine, mesh, rules))
      losses.append(float(loss))
    return params, opt, losses

  params, opt, losses = run(params, opt, 0, STEPS_BEFORE)
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'ckpt'),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(STEPS_BEFORE, args=ocp.args.StandardSave({'params': params, 'opt': opt}))
  mngr.wait_until_finished()
  # Continue from memory, then from the checkpoint restored onto fresh sharded buffers.
  cont_params, _, cont_losses = run(params, opt, STEPS_BEFORE, STEPS_AFTER)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        {'params': params, 'opt': opt}, {'params': p_sh, 'opt': o_sh})
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
  mu = restored['opt'][0].mu['language_model']['moe_layers']['mlp']['experts']['gate_proj']
  mu_info = {'mu_spec': str(mu.sharding.spec), 'mu_shape': list(mu.shape),
             'mu_local_shape': list(mu.addressable_shards[0].data.shape)}
  r_params, _, r_losses = run(restored['params'], restored['opt'], STEPS_BEFORE, STEPS_AFTER)

  def checksum(tree):
    return float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

  result = {
      'process_count': nproc, 'device_count': jax.device_count(),
      'local_devices': jax.local_device_count(),
      'losses': losses + cont_losses, 'restored_losses': losses + r_losses,
      'checksum': checksum(cont_params), 'restored_checksum': checksum(r_params),
      **mu_info,
  }
  if pid == 0:
    with open(out_path, 'w') as f:
      json.dump(result, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
