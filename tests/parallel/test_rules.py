"""Rule presets, parameter / ZeRO-1 optimizer-state shardings and batch sharding (8 CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from kimi_vl_jax.model.layers import param_with_axes
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib

L, E, D, F, V, N, H = 2, 8, 16, 12, 40, 4, 6


class Toy(nn.Module):
  """Parameters with the logical names (and layout) of docs/param_tree.md."""

  @nn.compact
  def __call__(self, ids):
    init = nn.initializers.normal(0.1)
    emb = param_with_axes(self, 'embedding', init, (V, D), jnp.float32, ('vocab', 'embed'))
    wq = param_with_axes(self, 'wq', init, (L, D, N, H), jnp.float32,
                         ('layers', 'embed', 'heads', 'kv'))
    experts = param_with_axes(self, 'experts', init, (L, E, D, F), jnp.float32,
                              ('layers', 'expert', 'embed', 'expert_mlp'))
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (D,), jnp.float32, ('norm',))
    x = emb[ids] * scale                                        # [B, T, D]
    for l in range(L):
      q = jnp.einsum('BTD,DNH->BTNH', x, wq[l])
      x = x + jnp.tanh(q).reshape(x.shape[:2] + (-1,))[..., :D]
      h = jnp.einsum('BTD,EDF->BTEF', x, experts[l]).mean(2)
      x = x + jnp.einsum('BTF,EDF->BTD', h, experts[l]) / E
    return jnp.einsum('BTD,VD->BTV', x, emb)


def _mesh(**kw):
  c = mesh_lib.default_config()
  c.update(kw)
  return mesh_lib.make_mesh(c)


def _abstract():
  return jax.eval_shape(lambda: Toy().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))[
      'params']


def test_every_preset_only_names_real_mesh_axes():
  for name in rules_lib.PRESETS:
    rules = rules_lib.get_rules(name)
    for _, v in rules:
      for a in (v if isinstance(v, tuple) else (v,)):
        assert a in mesh_lib.AXES, (name, a)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    rules_lib.get_rules([('embed', 'model')])


def test_param_specs_per_preset():
  mesh = _mesh(data=2, expert=2, pipeline=2)
  abstract = _abstract()
  dp = rules_lib.param_specs(abstract, mesh, 'dp')
  assert all(s == P() for s in jax.tree.leaves(dp, is_leaf=lambda x: isinstance(x, P)))
  ep = rules_lib.param_specs(abstract, mesh, 'fsdp_ep')
  assert ep['experts'] == P(None, 'expert', 'data')
  assert ep['embedding'] == P(None, 'data')
  assert ep['scale'] == P()
  pp = rules_lib.param_specs(abstract, mesh, 'dp_ep_pp')
  assert pp['experts'] == P('pipeline', 'expert') and pp['wq'] == P('pipeline')


def test_indivisible_dims_stay_unsplit():
  mesh = _mesh(data=8)
  specs = rules_lib.param_specs(_abstract(), mesh, 'fsdp')
  assert specs['embedding'] == P(None, 'data')     # D=16 splits 8 ways
  spec = rules_lib.fit_spec(P(('data', 'expert')), (12,), _mesh(data=4, expert=2))
  assert spec == P('data')                          # 12 % 8 != 0, 12 % 4 == 0


def test_zero1_spec_picks_largest_divisible_dim():
  mesh = _mesh(data=4, expert=2)
  assert rules_lib.zero1_spec(P(), (6, 40), mesh) == P(None, 'data')
  assert rules_lib.zero1_spec(P(), (40, 6), mesh) == P('data')
  assert rules_lib.zero1_spec(P(None, 'expert'), (3, 8), mesh) == P(None, ('expert', 'data'))
  assert rules_lib.zero1_spec(P(), (3, 5), mesh) == P()
  assert rules_lib.zero1_spec(P('data'), (8, 8), mesh) == P('data')


def test_opt_state_is_zero1_sharded_and_update_matches_unsharded():
  mesh = _mesh(data=4, expert=2)
  rules = 'dp_ep'
  abstract = _abstract()
  params = nn.meta.unbox(Toy().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  abstract_opt = jax.eval_shape(tx.init, params)
  specs = rules_lib.opt_state_specs(abstract_opt, abstract, mesh, rules)
  adam = specs[1][0]
  assert adam.mu['experts'] == P(None, 'expert', 'data')   # E on expert, D (largest) on data
  assert adam.nu['embedding'] == P('data')                       # V=40 over data=4
  assert adam.count == P()
  p_sh = rules_lib.param_shardings(abstract, mesh, rules)
  o_sh = rules_lib.opt_state_shardings(abstract_opt, abstract, mesh, rules)
  ids = np.random.default_rng(0).integers(0, V, (8, 5)).astype(np.int32)

  def step(p, o, ids):
    def loss(p):
      logits = Toy().apply({'params': p}, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  ref_p, ref_o = jax.jit(step)(params, tx.init(params), ids)
  with rules_lib.sharding_context(mesh, rules):
    f = jax.jit(step, in_shardings=(p_sh, o_sh, rules_lib.batch_sharding(mesh, rules)),
                out_shardings=(p_sh, o_sh))
    new_p, new_o = f(jax.device_put(params, p_sh), jax.device_put(tx.init(params), o_sh),
                     rules_lib.shard_batch({'ids': ids}, mesh, rules)['ids'])
  mu = new_o[1][0].mu['experts']
  assert mu.sharding.spec == P(None, 'expert', 'data')
  assert mu.addressable_shards[0].data.shape == (L, E // 2, D // 4, F)
  for a, b in zip(jax.tree.leaves((new_p, new_o)), jax.tree.leaves((ref_p, ref_o))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_shard_batch_builds_global_arrays():
  mesh = _mesh(data=2, expert=2, context=2)
  host = {'input_ids': np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
          'patches': np.ones((8, 4, 3), np.float32)}
  out = rules_lib.shard_batch(host, mesh, 'dp_ep')
  assert out['input_ids'].sharding.spec == P(('data', 'expert'))
  assert out['input_ids'].addressable_shards[0].data.shape == (2, 6)
  np.testing.assert_array_equal(np.asarray(out['input_ids']), host['input_ids'])
  assert out['patches'].shape == (8, 4, 3)
  with pytest.raises(ValueError, match='leading row axis'):
    rules_lib.shard_batch({'x': np.float32(1)}, mesh)
