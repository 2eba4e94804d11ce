"""Pipeline parallelism: schedule == plain layer loop (toy layers and the decoder's MoE stack),
values and gradients, aux recombination, 8-device meshes, stage-axis sharding, validation."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.decoder import LanguageModel
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import pipeline as pp
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_trees_close(got, want, tol=1e-5):
  errs = jax.tree.map(rel_err, got, want)
  worst = max(jax.tree.leaves(errs))
  assert worst <= tol, errs


# ---------------------------------------------------------------------------------------------
# Schedule arithmetic and validation.

def test_bubble_fraction():
  assert pp.bubble_fraction(1, 8) == 0.0
  assert pp.bubble_fraction(2, 2) == pytest.approx(1 / 3)
  assert pp.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pp.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)  # circular: smaller bubble
  assert pp.num_iterations(4, 8, 2) == 19
  c = config_lib.tiny().replace(pipeline_stages=2, pipeline_microbatches=4)
  assert pp.config_bubble_fraction(c) == pytest.approx(1 / 5)


def with_layers(n, **kw):
  c = config_lib.tiny()
  return c.replace(text=dataclasses.replace(c.text, num_layers=n, vocab_size=64), **kw)


def test_config_validation():
  with pytest.raises(ValueError, match='not divisible by pipeline_stages x pipeline_repeats'):
    with_layers(3, pipeline_stages=2, pipeline_repeats=2)          # 2 MoE layers, S*R = 4
  with pytest.raises(ValueError, match='needs pipeline_microbatches >= pipeline_stages'):
    with_layers(5, pipeline_stages=2, pipeline_repeats=2, pipeline_microbatches=1)
  with pytest.raises(ValueError, match='scan_layers=True'):
    with_layers(3, pipeline_stages=2, scan_layers=False)
  with pytest.raises(ValueError, match='pipeline_microbatches must be a positive int'):
    with_layers(3, pipeline_microbatches=0)
  with pytest.raises(ValueError, match='not divisible by pipeline_microbatches=3'):
    config_lib.check_pipeline(4, batch=8, stages=2, microbatches=3)
  c = with_layers(3, pipeline_stages=2, pipeline_microbatches=3)
  params = jax.eval_shape(LanguageModel(with_layers(3)).init, jax.random.key(0),
                          jnp.zeros((1, 4, 64)))
  with pytest.raises(ValueError, match='4 rows, not divisible by pipeline_microbatches=3'):
    jax.eval_shape(LanguageModel(c, kernels=build_kernels(c)).apply, params,
                   jnp.zeros((4, 4, 64)))


def test_microbatch_split_is_strided_and_invertible():
  x = jnp.arange(12 * 2).reshape(12, 2)
  mb = pp.to_microbatches(x, 3)
  assert mb.shape == (3, 4, 2)
  np.testing.assert_array_equal(mb[1, :, 0], [2, 8, 14, 20])       # rows 1, 4, 7, 10
  np.testing.assert_array_equal(pp.from_microbatches(mb), x)


def test_stage_rules_free_the_stage_mesh_axis():
  inner, axes = pp.stage_rules(rules_lib.get_rules('dp_ep_pp'))
  assert axes == ('pipeline',)
  d = dict(inner)
  assert d['stage'] == 'pipeline' and d['act_batch'] == ('data', 'expert')
  assert d['layers'] is None and d['expert'] == 'expert'
  inner, axes = pp.stage_rules((('stage', 'data'), ('act_batch', ('data', 'expert'))))
  assert axes == ('data',) and dict(inner)['act_batch'] == 'expert'


# ---------------------------------------------------------------------------------------------
# The schedule on toy layers: cheap to compile, so many (S, M, R) run fast.

def toy_layer(w, x, pos, seg):
  """x [b, T, D] -> tanh(x W + b) masked by segment, + position signal; aux depends on layer and
  microbatch so a mis-ordered or mis-gathered aux shows."""
  y = jnp.tanh(jnp.einsum('BTD,DE->BTE', x, w['w']) + w['b']) * (seg[..., None] != 0)
  y = y + 0.01 * pos[..., None]
  return y, {'mean': y.mean(), 'first': y[:, 0, :2]}


def toy_reference(params, x, pos, seg):
  def body(h, w):
    return toy_layer(w, h, pos, seg)
  return jax.lax.scan(body, x, params)


_slow = pytest.mark.slow


@pytest.mark.parametrize('S,M,R,remat', [
    (2, 2, 1, 'none'), (2, 4, 1, 'none'), (2, 2, 2, 'full'), (4, 4, 2, 'none'), (2, 3, 2, 'none'),
    pytest.param(4, 4, 1, 'none', marks=_slow), pytest.param(1, 2, 1, 'none', marks=_slow),
    pytest.param(2, 1, 1, 'none', marks=_slow), pytest.param(2, 4, 1, 'full', marks=_slow),
    pytest.param(4, 8, 2, 'dots_with_no_batch_dims_saveable', marks=_slow)])
def test_schedule_matches_layer_loop(S, M, R, remat):
  L, B, T, D = 2 * S * R, 12 if M == 3 else 8, 3, 4
  k = jax.random.split(jax.random.key(0), 3)
  params = {'w': 0.5 * jax.random.normal(k[0], (L, D, D)), 'b': jax.random.normal(k[1], (L, D))}
  x = jax.random.normal(k[2], (B, T, D))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T)).astype(jnp.int32)
  seg = jnp.ones((B, T), jnp.int32).at[1, 2].set(0)

  def loss(f, p, x):
    y, aux = f(p, x)
    return (y ** 2).sum() + aux['mean'].sum(), (y, aux)

  run = lambda p, x: pp.pipeline(toy_layer, p, x, pos, seg, stages=S, microbatches=M, repeats=R,
                                 remat_policy=remat)
  (_, (y1, aux1)), g1 = jax.jit(jax.value_and_grad(lambda p, x: loss(run, p, x), (0, 1),
                                                   has_aux=True))(params, x)
  assert aux1['mean'].shape == (M, L) and aux1['first'].shape == (M, L, B // M, 2)
  # Reference: the same layers per microbatch, no pipeline.
  ref = lambda p, x: toy_reference(p, x, pos, seg)
  y0, aux0 = ref(params, x)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
  for m in range(M):
    rows = np.arange(m, B, M)
    _, aux_m = toy_reference(params, x[rows], pos[rows], seg[rows])
    np.testing.assert_allclose(aux1['mean'][m], aux_m['mean'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux1['first'][m], aux_m['first'], rtol=1e-6, atol=1e-6)

  def ref_loss(p, x):
    aux_mean = sum(toy_reference(p, x[m::M], pos[m::M], seg[m::M])[1]['mean'] for m in range(M))
    y, _ = ref(p, x)
    return (y ** 2).sum() + aux_mean.sum()
  g0 = jax.grad(ref_loss, (0, 1))(params, x)
  assert_trees_close(g1, g0, 1e-5)


def test_remat_policy_is_applied():
  params = {'w': jnp.zeros((4, 2, 2)), 'b': jnp.zeros((4, 2))}
  x, pos, seg = jnp.zeros((4, 3, 2)), jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32)
  jaxpr = lambda policy: str(jax.make_jaxpr(lambda p: pp.pipeline(
      toy_layer, p, x, pos, seg, stages=2, microbatches=2, remat_policy=policy))(params))
  assert 'checkpoint' in jaxpr('full') or 'remat' in jaxpr('full')
  assert 'checkpoint' not in jaxpr('none') and 'remat' not in jaxpr('none')


# ---------------------------------------------------------------------------------------------
# The decoder: pipelined MoE stack == nn.scan, logits, aux and gradients.

B, T = 8, 8


def batch(config, seed=1):
  """Embeddings and a packed batch: row 0 holds two sequences, row 3 ends in padding, row 5 is
  all padding (so microbatches differ in token and sequence counts)."""
  D = config.text.hidden_size
  x = jax.random.normal(jax.random.key(seed), (B, T, D))
  seg = np.ones((B, T), np.int32)
  seg[0, 5:], seg[3, 6:], seg[5] = 2, 0, 0
  pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32).copy()
  pos[0, 5:] = np.arange(T - 5)
  return x, pos, seg


_PARAMS = {}


def params_of(config):
  key = config.text
  if key not in _PARAMS:
    boxed = LanguageModel(config).init(jax.random.key(0),
                                       jnp.zeros((1, 4, config.text.hidden_size)))['params']
    params = nn.meta.unbox(boxed)
    # A non-zero router bias, as after some training.
    gate = params['moe_layers']['mlp']['gate']
    gate['e_score_correction_bias'] = 0.05 * jax.random.normal(
        jax.random.key(7), gate['e_score_correction_bias'].shape)
    _PARAMS[key] = boxed, params
  return _PARAMS[key]


def objective(config, mesh=None, rules=None):
  """(params, x, pos, seg) -> (loss, (logits, aux)): a probe of the logits + the balance loss, so
  gradients flow through both the activations and the aux path. The model runs with the kernels
  `build_kernels` makes for `mesh` and `rules` (the pipeline schedule when pipeline_stages > 1)."""
  model = LanguageModel(config, kernels=build_kernels(config, mesh, rules))
  probe = jax.random.normal(jax.random.key(2), (config.text.vocab_size,))

  def f(params, x, pos, seg):
    logits, aux = model.apply({'params': params}, x, pos, seg)
    return (logits @ probe).sum() / logits.shape[0] + aux['balance_loss'], (logits, aux)
  return f


_RESULTS = {}


def unpipelined(config):
  """Single-device, scan-layout reference (cached per model)."""
  if config.text not in _RESULTS:
    _, params = params_of(config)
    _RESULTS[config.text] = jax.jit(jax.value_and_grad(objective(config), (0, 1), has_aux=True))(
        params, *batch(config))
  return _RESULTS[config.text]


def check_same(got, want):
  (l1, (logits1, aux1)), g1 = got
  (l0, (logits0, aux0)), g0 = want
  assert rel_err(l1, l0) <= 1e-5
  assert rel_err(logits1, logits0) <= 1e-5
  np.testing.assert_allclose(aux1['expert_load'], aux0['expert_load'], atol=1e-6)
  assert rel_err(aux1['balance_loss'], aux0['balance_loss']) <= 1e-5
  assert_trees_close(g1, g0, 1e-5)
  # The router-kernel gradient comes through the aux path too: it must be non-trivial.
  assert np.abs(np.asarray(g0[0]['moe_layers']['mlp']['gate']['kernel'])).max() > 0


@pytest.mark.parametrize('layers,S,M,R', [
    (3, 2, 2, 1),
    pytest.param(3, 2, 4, 1, marks=pytest.mark.slow),
    pytest.param(5, 2, 2, 2, marks=pytest.mark.slow),   # 4 MoE layers: R*S = 4 blocks of 1
])
def test_decoder_pipeline_matches_scan(layers, S, M, R):
  base = with_layers(layers)
  config = base.replace(pipeline_stages=S, pipeline_microbatches=M, pipeline_repeats=R)
  _, params = params_of(base)
  got = jax.jit(jax.value_and_grad(objective(config), (0, 1), has_aux=True))(
      params, *batch(config))
  check_same(got, unpipelined(base))


# ---------------------------------------------------------------------------------------------
# On 8 devices: data 2 x expert 2 x pipeline 2 with the `dp_ep_pp` preset.

def sharded_step(config, mesh, rules):
  boxed, params = params_of(config)
  with rules_lib.sharding_context(mesh, rules):
    ps = rules_lib.param_shardings(boxed, mesh, rules)
    bs = NamedSharding(mesh, P(rules_lib.mesh_axes_of(rules, 'act_batch')))
    fn = jax.jit(jax.value_and_grad(objective(config, mesh, rules), (0, 1), has_aux=True),
                 in_shardings=(ps, bs, bs, bs))
    params = jax.device_put(params, ps)
    x, pos, seg = (jax.device_put(a, bs) for a in batch(config))
    compiled = fn.lower(params, x, pos, seg).compile()
    out = compiled(params, x, pos, seg)
  return out, compiled.as_text()


def stage_gathered_expert_shapes(hlo: str, config, mesh) -> list[str]:
  """Collectives (per-device HLO) whose result holds routed-expert weights of more than one
  stage's worth of layers (local experts x local layers): D and Fe trailing dims and leading dims
  of a larger product, e.g. the layer stack all-gathered over 'pipeline'."""
  t = config.text
  local = (t.n_routed_experts // mesh.shape['expert']
           * t.num_moe_layers // mesh.shape['pipeline'])
  bad = set()
  for dims, op in re.findall(r'= f32\[([0-9,]+)\]\S* (all-gather|all-reduce|collective-permute|'
                             r'all-to-all)', hlo):
    d = [int(v) for v in dims.split(',')]
    if len(d) >= 3 and tuple(d[-2:]) in ((t.hidden_size, t.moe_intermediate_size),
                                         (t.moe_intermediate_size, t.hidden_size)):
      if int(np.prod(d[:-2])) > local:
        bad.add(f'{op} f32[{dims}]')
  return sorted(bad)


def dp_ep_pp_mesh():
  return mesh_lib.make_mesh({'data': 2, 'expert': 2, 'pipeline': 2, 'context': 1})


def test_dp_ep_pp_mesh_matches_one_device():
  base = with_layers(3)
  config = base.replace(pipeline_stages=2, pipeline_microbatches=2)
  mesh = dp_ep_pp_mesh()
  got, hlo = sharded_step(config, mesh, 'dp_ep_pp')
  check_same(got, unpipelined(base))
  # Stage axis really split: no device ever holds both stages' expert weights, and stage outputs
  # move by collective permutes.
  assert stage_gathered_expert_shapes(hlo, config, mesh) == []
  assert 'collective-permute' in hlo
  # Gradients come back in the parameters' own sharding (layers over 'pipeline').
  g = got[1][0]['moe_layers']['mlp']['experts']['gate_proj']
  assert g.sharding.shard_shape(g.shape)[0] == config.text.num_moe_layers // 2


def test_microbatch_rows_must_split_over_batch_axes():
  config = with_layers(3, pipeline_stages=2, pipeline_microbatches=4)
  boxed, _ = params_of(with_layers(3))
  with rules_lib.sharding_context(dp_ep_pp_mesh(), 'dp_ep_pp'):
    with pytest.raises(ValueError, match=r"2 rows, not divisible by the 4 devices of mesh axes "
                       r"\('data', 'expert'\)"):
      model = LanguageModel(config, kernels=build_kernels(config, dp_ep_pp_mesh(), 'dp_ep_pp'))
      jax.eval_shape(model.apply, {'params': boxed}, jnp.zeros((8, 4, 64)))


@pytest.mark.slow
def test_unpipelined_dp_ep_pp_gathers_layers():
  """Control for the check above: without the schedule, XLA gathers the layer stack (so the
  stage-sharding assertion can fail)."""
  config = with_layers(3)
  mesh = dp_ep_pp_mesh()
  got, hlo = sharded_step(config, mesh, 'dp_ep_pp')
  check_same(got, unpipelined(config))
  assert stage_gathered_expert_shapes(hlo, config, mesh) != []


@pytest.mark.slow
@pytest.mark.parametrize('layers,R', [(3, 1), (5, 2)])
def test_expert_pipeline_context_mesh_matches_one_device(layers, R):
  """expert 2 x pipeline 2 x context 2: the sequence split over 'context' (rules written here
  until a preset combines the three); R=2 is circular over 4 MoE layers."""
  base = with_layers(layers)
  config = base.replace(pipeline_stages=2, pipeline_microbatches=2, pipeline_repeats=R)
  mesh = mesh_lib.make_mesh({'data': 1, 'expert': 2, 'pipeline': 2, 'context': 2})
  rules = (('act_batch', ('data', 'expert')), ('act_len', 'context'), ('layers', 'pipeline'),
           ('expert', 'expert'), ('act_expert', 'expert'))
  got, hlo = sharded_step(config, mesh, rules)
  check_same(got, unpipelined(base))
  if R == 1:
    assert stage_gathered_expert_shapes(hlo, config, mesh) == []
  else:
    # Known cost of circular repeats: the stored layer order (contiguous blocks of the [L] stack
    # per 'pipeline' device) is not the circular order, and XLA re-lays it out by gathering.
    assert stage_gathered_expert_shapes(hlo, config, mesh) != []


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['ep_dropless', 'ep_capacity'])
def test_expert_parallel_dispatch_inside_the_pipeline(impl):
  """parallel/expert.py's shard_map all-to-all dispatch runs inside the stage vmap (its batch dim
  split over 'pipeline' by spmd_axis_name) and matches one device. capacity_factor = E/K: nothing
  is dropped, so microbatching does not change which assignments 'ep_capacity' keeps."""
  base = with_layers(3)
  base = base.replace(text=dataclasses.replace(base.text, capacity_factor=4.0))
  config = base.replace(pipeline_stages=2, pipeline_microbatches=2,
                        text=dataclasses.replace(base.text, moe_impl=impl))
  got, hlo = sharded_step(config, dp_ep_pp_mesh(), 'dp_ep_pp')
  check_same(got, unpipelined(base))
  assert 'all-to-all' in hlo
