"""Context parallelism (parallel/context.py) on 8 emulated CPU devices, fp32.

The tiny KimiVL (images + two packed text segments per row) under data 2 x context 4 must give the
single-device logits, loss and gradients, with and without the load-balanced layout; the compiled
step's all-gather attention must gather MLA's latent (R + Hr values per token, not the expanded
per-head K/V) over 'context' and keep per-device attention logits at T/C x T.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.model import KimiVL, attention
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import mla
from kimi_vl_jax.model.decoder import LanguageModel
from kimi_vl_jax.model.kimi_vl import init_params
from kimi_vl_jax.model.vision import MoonViT, merge_order
from kimi_vl_jax.parallel import context, hlo_cost
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.train.losses import cross_entropy_sums

B, T = 2, 32                      # T / (2 x context 4) = 4-token chunks
GRID = (4, 4)                     # one 4x4-patch image per row -> 4 merged tokens
PAD_ID = 1023                     # tiny()'s media placeholder


def _config(**kw):
  c = config_lib.tiny()
  # Fewer layers than tiny() to keep compile time down; still 1 dense + 1 MoE decoder layer.
  return c.replace(vision=dataclasses.replace(c.vision, num_layers=1),
                   text=dataclasses.replace(c.text, num_layers=2, **kw))


def _mesh(**kw):
  c = mesh_lib.default_config()
  c.update(kw)
  return mesh_lib.make_mesh(c)


def _batch(seed=0):
  """Two rows, each: segment 1 with an image (4 placeholders), segment 2 text; row 1 padded."""
  r = np.random.default_rng(seed)
  ids = r.integers(0, 1000, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[0, 13:] = 2
  seg[1, 20:] = 2
  seg[1, 29:] = 0
  ids[0, 2:6] = PAD_ID
  ids[1, 5:9] = PAD_ID
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for s in np.unique(seg[b]):
      pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
  h, w = GRID
  order = merge_order(h, w)
  coords = np.stack([order // w, order % w], -1).astype(np.int32)
  return dict(
      input_ids=ids, segment_ids=seg, positions=pos,
      targets=r.integers(0, 1000, (B, T)).astype(np.int32),
      loss_mask=((seg > 0) & (ids != PAD_ID)).astype(np.float32),
      patches=r.normal(size=(B, h * w, 588)).astype(np.float32),
      patch_coords=np.broadcast_to(coords, (B, h * w, 2)).copy(),
      patch_image_ids=np.ones((B, h * w), np.int32),
      image_grid_hws=np.array([[GRID]] * B, np.int32))


def _step_fn(model):
  """(params, batch) -> ((loss, logits), grads) in one compiled function."""
  def loss(p, b):
    logits = model.apply({'params': p}, b['input_ids'], positions=b['positions'],
                         segment_ids=b['segment_ids'], patches=b['patches'],
                         patch_coords=b['patch_coords'], patch_image_ids=b['patch_image_ids'],
                         image_grid_hws=b['image_grid_hws'])
    return cross_entropy_sums(logits, b['targets'], b['loss_mask'])['loss_sum'], logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _init(config, seed=0):
  """Random parameters of the right tree and shapes, drawn on the host (compiling the Linen init
  would cost as much as the step): norm scales near 1, everything else small."""
  r = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda k: nn.meta.unbox(init_params(config, k)), jax.random.key(0))

  def leaf(path, a):
    name = str(path[-1].key)
    x = r.normal(size=a.shape).astype(np.float32)
    return 1.0 + 0.1 * x if name == 'scale' else 0.05 * x
  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope='module')
def setup():
  config = _config()
  params = _init(config)
  batch = _batch()
  (loss, logits), grads = _step_fn(KimiVL(config))(params, batch)
  return config, params, batch, (loss, logits, grads)


def _run_sharded(config, params, batch, mesh, rules):
  with rules_lib.sharding_context(mesh, rules):
    spec = rules_lib.batch_sharding(mesh, rules)
    sharded = {k: jax.device_put(v, spec) for k, v in batch.items()}
    fn = _step_fn(KimiVL(config, kernels=build_kernels(config, mesh, rules)))
    (loss, logits), grads = fn(params, sharded)
    hlo = fn.lower(params, sharded).compile().as_text()
  return (loss, logits, grads), hlo


def _assert_matches(got, ref):
  (loss, logits, grads), (rloss, rlogits, rgrads) = got, ref
  assert _rel_err(loss, rloss) <= 1e-5
  assert _rel_err(logits, rlogits) <= 1e-5
  errs = jax.tree.map(_rel_err, grads, rgrads)
  worst = max(jax.tree.leaves(errs))
  assert worst <= 1e-5, {jax.tree_util.keystr(k): e for k, e in
                         jax.tree_util.tree_flatten_with_path(errs)[0] if e > 1e-5}


def _kv_gathers(hlo: str, n_heads: int) -> list[str]:
  """HLO lines all-gathering a [b, T, N, .] array (keys / values) over 'context'."""
  pat = re.compile(rf'= f32\[\d+,{T},{n_heads},\d+\]\S* all-gather\(')
  return [l for l in hlo.splitlines() if pat.search(l) and "{'context'}" in l]


def _attention_context_gathers(hlo: str, scope: str = '/self_attn/') -> list[hlo_cost.Instruction]:
  """The all-gathers over the 'context' mesh axis alone whose op_name contains `scope` (default:
  the decoder's attention; forward only, their backward is a reduce-scatter), from the HLO."""
  comps, _ = hlo_cost.parse_module(hlo)
  return [i for c in comps.values() for i in c.instructions
          if i.opcode in ('all-gather', 'all-gather-start') and "{'context'}" in i.attrs
          and scope in i.op_name]


def _attention_logit_shapes(hlo: str, n_heads: int) -> set[tuple[int, ...]]:
  """Shapes [b, N, t, s] of f32 4-D buffers whose second dim is the head count."""
  shapes = {tuple(int(d) for d in m.split(','))
            for m in re.findall(r'f32\[(\d+,\d+,\d+,\d+)\]', hlo)}
  return {s for s in shapes if s[1] == n_heads and s[2] in (T, T // 4) and s[3] in (T, T // 4)}


# --------------------------------------------------------------------------------------------
# The layout.

@pytest.mark.parametrize('seq_len, C', [(8, 1), (16, 2), (32, 4), (64, 8), (48, 3)])
def test_permutation_is_a_balanced_bijection(seq_len, C):
  perm = context.load_balance_permutation(seq_len, C)
  assert sorted(perm.tolist()) == list(range(seq_len))
  inv = context.inverse_permutation(perm)
  np.testing.assert_array_equal(perm[inv], np.arange(seq_len))
  np.testing.assert_array_equal(inv[perm], np.arange(seq_len))
  # Shard i holds chunks i and 2C-1-i; its causal (q, k) pair count is equal across shards.
  n = seq_len // (2 * C)
  for i, shard in enumerate(perm.reshape(C, 2 * n)):
    assert shard[0] == i * n and shard[n] == (2 * C - 1 - i) * n
  pairs = [int((shard + 1).sum()) for shard in perm.reshape(C, 2 * n)]
  assert max(pairs) == min(pairs), pairs   # exactly equal (the brief asks: within one chunk)
  if C > 1:
    contiguous = [int((s + 1).sum()) for s in np.arange(seq_len).reshape(C, -1)]
    assert max(contiguous) - min(contiguous) > n * n   # what the layout is for


def test_indivisible_sequence_is_a_clear_error():
  with pytest.raises(ValueError, match=r'sequence length 36 is not divisible by 8'):
    context.load_balance_permutation(36, 4)
  mesh = _mesh(data=2, context=4)
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    with pytest.raises(ValueError, match=r'not divisible by 8 .*2 x context chunks'):
      jax.eval_shape(lambda x: context.to_load_balanced(x, 4, mesh), jnp.zeros((2, 36, 3)))


def test_unknown_implementation_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown context_parallel 'ringg'.*all_gather"):
    build_kernels(_config(context_parallel='ringg'), _mesh(data=2, context=4), 'dp_cp')


def test_relayout_by_ppermute_equals_gather_and_inverts():
  x = np.arange(2 * T * 3, dtype=np.float32).reshape(2, T, 3)
  perm = context.load_balance_permutation(T, 4)
  mesh = _mesh(data=2, context=4)
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    xs = jax.device_put(x, NamedSharding(mesh, P('data', 'context')))
    to = jax.jit(functools.partial(context.to_load_balanced, context=4, mesh=mesh))
    balanced = to(xs)
    back = jax.jit(functools.partial(context.from_load_balanced, context=4, mesh=mesh))(balanced)
    hlo = to.lower(xs).compile().as_text()
  np.testing.assert_array_equal(np.asarray(balanced), x[:, perm])
  np.testing.assert_array_equal(np.asarray(back), x)
  assert 'collective-permute' in hlo and 'all-gather' not in hlo
  # Without a mesh, an explicit context size applies the same permutation.
  np.testing.assert_array_equal(np.asarray(context.to_load_balanced(x, 4)), x[:, perm])


# --------------------------------------------------------------------------------------------
# Attention alone: sharded == single device (values and gradients), both layouts.

@pytest.mark.parametrize('impl', ['all_gather', 'ring', 'all_gather+flash'])
@pytest.mark.parametrize('layout', ['sequence', 'load_balanced'])
def test_attention_matches_single_device(impl, layout):
  r = np.random.default_rng(3)
  N, H = 2, 8
  q, k, v = (r.normal(size=(B, T, N, H)).astype(np.float32) for _ in range(3))
  seg = _batch()['segment_ids']
  scale = H ** -0.5

  def loss(fn, q, k, v, seg):
    out = fn(q, k, v, seg)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size), out

  single = lambda q, k, v, seg: attention.causal_attention(q, k, v, seg, scale)  # noqa: E731
  (_, ref), ref_g = jax.value_and_grad(lambda *a: loss(single, *a), (0, 1, 2), has_aux=True)(
      q, k, v, seg)
  perm = context.layout_index(T, 4, layout)
  inv = context.inverse_permutation(perm)

  impl, _, kernel = impl.partition('+')
  config = _config(context_parallel=impl)
  if kernel:
    config = config.replace(attention_impl=kernel, attention_block_q=4, attention_block_kv=8)
  mesh = _mesh(data=2, context=4)
  kernels = build_kernels(config, mesh, 'dp_cp')
  assert isinstance(kernels.causal_attention, context.ContextAttention)

  def sharded(q, k, v, seg):  # inputs / outputs in sequence order, attention in `layout`
    q, k, v, seg = (a[:, perm] for a in (q, k, v, seg))
    out = kernels.causal_attention(q, k, v, seg, scale, kernel=kernels.attention, layout=layout)
    return out[:, inv]

  with rules_lib.sharding_context(mesh, 'dp_cp'):
    fn = jax.jit(jax.value_and_grad(lambda *a: loss(sharded, *a), (0, 1, 2), has_aux=True))
    (_, got), got_g = fn(q, k, v, seg)
    hlo = fn.lower(q, k, v, seg).compile().as_text()
  assert _rel_err(got, ref) <= 1e-5
  for g, rg in zip(got_g, ref_g):
    assert _rel_err(g, rg) <= 1e-5
  shapes = _attention_logit_shapes(hlo, N)
  gathers = _kv_gathers(hlo, N)
  if kernel:   # flash: scores only in [4 x 8] blocks, K/V still gathered
    assert len(gathers) == 2 and (B // 2, N, T // 4, T) not in shapes, (shapes, gathers)
  elif impl == 'all_gather':
    assert (B // 2, N, T // 4, T) in shapes and len(gathers) == 2, (shapes, gathers)
  else:  # blocks travel by collective-permute; scores are T/C x T/C per step
    assert not gathers and 'collective-permute' in hlo
    assert shapes and all(s[2:] == (T // 4, T // 4) for s in shapes), shapes


@pytest.mark.parametrize('mesh_shape, layout, impl', [
    ((2, 4), 'sequence', 'dense'), ((2, 4), 'load_balanced', 'dense'),
    ((4, 2), 'load_balanced', 'dense'), ((2, 4), 'load_balanced', 'flash')])
def test_latent_attention_matches_single_device(mesh_shape, layout, impl):
  """`latent_attention` (gather the latent, expand on every shard) gives the single-device values
  and gradients w.r.t. q, the latent and the expansion's weights: the weights' gradient is summed
  over the context (and batch) shards exactly once. data 4 x context 2 replicates the B = 2 rows
  over part of 'data', so there the weights' gradient must not be summed over those copies."""
  r = np.random.default_rng(4)
  N, Hn, Hr, Hv, R = 2, 8, 4, 6, 5
  q = r.normal(size=(B, T, N, Hn + Hr)).astype(np.float32)
  latent = r.normal(size=(B, T, R + Hr)).astype(np.float32)
  w = (0.3 * r.normal(size=(R, N, Hn + Hv))).astype(np.float32)
  seg = _batch()['segment_ids']
  scale = (Hn + Hr) ** -0.5
  expand = functools.partial(mla.expand_latent, nope_dim=Hn)
  weights = jnp.arange(B * T * N * Hv).reshape(B, T, N, Hv) / (B * T * N * Hv)

  def single(q, latent, w, seg):
    k, v = expand(w, latent)
    return attention.causal_attention(q, k, v, seg, scale)

  data, C = mesh_shape
  mesh = _mesh(data=data, context=C)
  kernels = build_kernels(_config().replace(attention_impl=impl, attention_block_q=4,
                                            attention_block_kv=8), mesh, 'dp_cp')
  perm = context.layout_index(T, C, layout)
  inv = context.inverse_permutation(perm)

  def sharded(q, latent, w, seg):  # inputs / outputs in sequence order, attention in `layout`
    q, latent, seg = (a[:, perm] for a in (q, latent, seg))
    out = kernels.latent_attention(q, latent, expand, w, seg, scale, kernel=kernels.attention,
                                   layout=layout)
    return out[:, inv]

  def grads(fn):
    loss = lambda *a: (jnp.sum(jnp.sin(fn(*a, seg)) * weights), fn(*a, seg))  # noqa: E731
    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)

  (_, ref), ref_g = grads(single)(q, latent, w)
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    fn = jax.jit(grads(sharded))
    (_, got), got_g = fn(q, latent, w)
    gathers = _attention_context_gathers(fn.lower(q, latent, w).compile().as_text(), '')
  assert _rel_err(got, ref) <= 1e-5
  for name, g, rg in zip(('q', 'latent', 'w'), got_g, ref_g):
    assert _rel_err(g, rg) <= 1e-5, name
  # The latent and the segment ids travel, not K/V.
  b = B // data if B % data == 0 else B          # rows not divisible by 'data' are replicated
  assert sorted(i.shape.arrays[0][:2] for i in gathers) == [('f32', (b, T, R + Hr)),
                                                            ('s32', (b, T))], [
      i.line for i in gathers]


def test_only_the_all_gather_form_takes_the_latent():
  mesh = _mesh(data=2, context=4)
  ring = build_kernels(_config(context_parallel='ring'), mesh, 'dp_cp')
  assert ring.latent_attention is None          # MLA expands, the ring moves K/V blocks
  gather = build_kernels(_config(), mesh, 'dp_cp')
  assert isinstance(gather.latent_attention, context.LatentContextAttention)
  assert gather == build_kernels(_config(), mesh, 'dp_cp')    # a value: equal builds compare equal
  assert build_kernels(_config()).latent_attention is None    # no mesh


def test_attention_memory_per_device_shrinks_with_context():
  """compiled.memory_analysis(): the attention fwd+bwd temporaries per device under data 2 x
  context 4 shrink with the T x T -> T/C x T logits on half the rows (ideal 1/8; measured about
  1/4.8: the sharded program keeps a few more [t, T] buffers alive)."""
  Bm, Tm, N, H = 2, 512, 4, 16
  q = jax.ShapeDtypeStruct((Bm, Tm, N, H), jnp.float32)
  seg = jax.ShapeDtypeStruct((Bm, Tm), jnp.int32)

  mesh = _mesh(data=2, context=4)

  def temp_bytes(impl, layout='sequence'):
    kernels = build_kernels(_config(context_parallel=impl), mesh, 'dp_cp')

    def grads(q, k, v, seg):
      attend = lambda *a: kernels.causal_attention(*a, seg, 0.1, layout=layout).sum()  # noqa: E731
      return jax.grad(attend, (0, 1, 2))(q, k, v)
    return jax.jit(grads).lower(q, q, q, seg).compile().memory_analysis().temp_size_in_bytes

  single = temp_bytes('none')
  logits_bytes = Bm * N * Tm * Tm * 4
  assert single >= 2 * logits_bytes        # logits and probabilities, at least
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    for impl, layout in [('all_gather', 'sequence'), ('all_gather', 'load_balanced'),
                         ('ring', 'load_balanced')]:
      per_device = temp_bytes(impl, layout)
      assert per_device <= single / 4, (impl, layout, per_device, single)


# --------------------------------------------------------------------------------------------
# Whole model: sharded == single device.

@pytest.fixture(scope='module')
def data2_context4(setup):
  """load_balance -> the sharded step's (loss, logits, grads) and compiled HLO (compiled once
  per layout for the tests below)."""
  config, params, batch, _ = setup
  runs = {}

  def run(load_balance):
    if load_balance not in runs:
      runs[load_balance] = _run_sharded(config.replace(context_load_balance=load_balance),
                                        params, batch, _mesh(data=2, context=4), 'dp_cp')
    return runs[load_balance]
  return run


@pytest.mark.parametrize('load_balance', [True, False])
def test_kimi_vl_data2_context4_matches_single_device(setup, data2_context4, load_balance):
  config, params, batch, ref = setup
  got, hlo = data2_context4(load_balance)
  _assert_matches(got, ref)
  assert config.text.context_parallel == 'all_gather'   # the default
  t = config.text
  # Every per-device attention logits buffer is [B/data, N, T/C, T] (or its transpose),
  # never T x T.
  shapes = _attention_logit_shapes(hlo, t.num_heads)
  assert (B // 2, t.num_heads, T // 4, T) in shapes, shapes
  assert all(T // 4 in s[2:] for s in shapes), shapes
  if load_balance:
    assert 'collective-permute' in hlo
  # The logits come back to sequence order by ppermute, never by gathering whole rows [b, T, V].
  assert not re.search(rf'= f32\[\d+,{T},{t.vocab_size}\]\S* all-gather\(', hlo)


def test_kimi_vl_context_all_gather_moves_the_latent(setup, data2_context4):
  """Each decoder attention all-gathers, per token, MLA's normalised latent and rotated rope key
  (kv_lora_rank + qk_rope_head_dim values) and the segment id over 'context', not the per-head
  keys and values (num_heads x (qk_head_dim + v_head_dim)); the bytes are counted in the HLO."""
  config = setup[0]
  t = config.text
  _, hlo = data2_context4(True)
  gathers = _attention_context_gathers(hlo)
  b = B // 2                                                   # rows per data shard
  floats = [i for i in gathers if i.shape.arrays[0][0] == 'f32']
  ints = [i for i in gathers if i.shape.arrays[0][0] == 's32']
  assert floats and ints, [i.line for i in gathers]
  assert all(i.shape.dims == (b, T) for i in ints), [i.line for i in ints]   # segment ids
  latent_bytes = sum(i.shape.bytes for i in floats)
  per_token = latent_bytes / (t.num_layers * b * T * 4)
  expanded = t.num_heads * (t.qk_head_dim + t.v_head_dim)
  assert per_token == t.kv_lora_rank + t.qk_rope_head_dim, (per_token, expanded)
  assert latent_bytes == t.num_layers * b * T * (t.kv_lora_rank + t.qk_rope_head_dim) * 4
  assert not _kv_gathers(hlo, t.num_heads)


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['ring', 'none'])
def test_kimi_vl_other_attention_impls_match(setup, impl):
  """'ring' (load-balanced), and 'none' (XLA's propagation, sequence layout): same numbers."""
  config, params, batch, ref = setup
  cfg = config.replace(text=dataclasses.replace(config.text, context_parallel=impl))
  got, hlo = _run_sharded(cfg, params, batch, _mesh(data=2, context=4), 'dp_cp')
  _assert_matches(got, ref)
  if impl == 'ring':
    assert not _kv_gathers(hlo, cfg.text.num_heads)


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['all_gather', 'ring'])
def test_kimi_vl_expert2_pipeline2_context2_matches_single_device(impl):
  """The pipelined MoE stack (2 stages x 2 microbatches) with experts and context split."""
  config = config_lib.tiny()
  config = config.replace(vision=dataclasses.replace(config.vision, num_layers=1))
  params = _init(config)
  # 4 rows: 2 microbatches of 2 rows, each split over expert=2.
  batch = {k: np.concatenate([a, _batch(1)[k]]) for k, a in _batch(0).items()}
  (loss, logits), grads = _step_fn(KimiVL(config))(params, batch)
  cfg = config.replace(pipeline_stages=2, pipeline_microbatches=2,
                       text=dataclasses.replace(config.text, context_parallel=impl))
  mesh = _mesh(data=1, expert=2, pipeline=2, context=2)
  got, hlo = _run_sharded(cfg, params, batch, mesh, 'fsdp_ep_cp')
  _assert_matches(got, (loss, logits, grads))
  assert not _kv_gathers(hlo, cfg.text.num_heads)          # the ring permutes, all_gather ...
  widths = {i.shape.dims[-1] for i in _attention_context_gathers(hlo)
            if i.shape.arrays[0][0] == 'f32'}               # ... gathers the latent
  t = cfg.text
  assert widths == ({t.kv_lora_rank + t.qk_rope_head_dim} if impl == 'all_gather' else set())


def test_language_model_alone_uses_the_sequence_layout(setup):
  """LanguageModel called directly (no permutation) under CP masks by the sequence order."""
  config, params, batch, _ = setup
  lm = LanguageModel(config)
  p = {'params': params['language_model']}
  x = jax.random.normal(jax.random.key(1), (B, T, config.text.hidden_size))
  seg, pos = batch['segment_ids'], batch['positions']
  ref, _ = jax.jit(lm.apply)(p, x, pos, seg)
  mesh = _mesh(data=2, context=4)
  kernels = build_kernels(config, mesh, 'dp_cp')
  assert kernels.sequence_layout is not None       # KimiVL would permute; LanguageModel does not
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    got, _ = jax.jit(LanguageModel(config, kernels=kernels).apply)(p, x, pos, seg)
  assert _rel_err(got, ref) <= 1e-5


# --------------------------------------------------------------------------------------------
# Vision tower: patches split over 'data' (rows), not over 'context'.

def test_vision_tower_patches_are_not_split_over_context(setup):
  config, params, batch, _ = setup
  vit = MoonViT(config.vision)
  p = {'params': params['vision_tower']}
  args = [batch[k] for k in ('patches', 'patch_coords', 'patch_image_ids', 'image_grid_hws')]
  ref = vit.apply(p, *args)
  mesh = _mesh(data=2, context=4)
  with rules_lib.sharding_context(mesh, 'dp_cp'):
    args = [jax.device_put(a, rules_lib.batch_sharding(mesh, 'dp_cp')) for a in args]
    fn = jax.jit(MoonViT(config.vision, kernels=build_kernels(config, mesh, 'dp_cp')).apply)
    out = fn(p, *args)
    hlo = fn.lower(p, *args).compile().as_text()
  assert _rel_err(out, ref) <= 1e-5
  spec = out.sharding.spec
  assert 'context' not in jax.tree.leaves(tuple(spec)), spec
  assert spec and spec[0] == 'data', spec
  # Each device attends over all P patches of its row (no context split, no gathers).
  n, npatch = config.vision.num_heads, GRID[0] * GRID[1]
  assert f'f32[{B // 2},{n},{npatch},{npatch}]' in hlo
  assert 'all-gather' not in hlo and 'collective-permute' not in hlo
