"""The SigLIP loss over a data-parallel batch without the global logits: a bidirectional text ring.

`model/siglip_loss.py` defines the loss (Kimi-VL report section 2.3, MoonViT pre-training): for a
global batch of B image / caption pairs, `-(1/B) sum_i sum_j log_sigmoid(label_ij * logits_ij)`.
With the batch split over n devices along the mesh axes of the batch, every device holds B/n
images and their B/n captions' embeddings. The sum splits into n x n blocks; device k owns the
rows of its images:

* its local block (its images x its texts) holds the positive diagonal;
* every block of another device's texts holds negatives only (label -1).

The text embeddings travel around the ring of the n devices with `ppermute`, in both directions
at once: at each step every device sends the block it last received on to the next neighbour
each way and adds the negative-only terms of the two blocks it receives, so the n - 1 foreign
blocks are seen in ceil((n - 1) / 2) steps (for even n, the last step goes one way only). Each
device then holds at most three [B/n, D] text blocks and one [B/n, B/n] logits block; the loss is
the `psum` of the per-device sums divided by B.

The backward is a second ring (a `jax.custom_vjp`), not autodiff through the first: autodiff would
keep every received block as a residual, i.e. every device would end up storing all B text
embeddings. Here the forward keeps only its inputs; the backward sends the text blocks around
again, each with an fp32 accumulator of its gradient that grows at every device it visits, and
one last `ppermute` returns each accumulator to the block's owner. The gradients of the
temperature and bias are summed over devices by the transpose of their broadcast into the
shard_map.

The ring is the devices of `axes` (the mesh axes the batch is split over, e.g. ('data',
'expert') in the expert-parallel rule presets) in their linear order; any other mesh axis holds
replicas that compute the same thing. `tests/parallel/test_siglip_ring.py` checks loss and
gradients against the single-device loss for rings of 2, 3 and 8 devices and that no compiled
buffer has the global [B, B] or [B, D] shape.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.local_attention import row_axes

Array = jax.Array


def _shift(n: int, k: int) -> list[tuple[int, int]]:
  """The ppermute moving each device's value k places along the ring (k may be negative)."""
  return [(i, (i + k) % n) for i in range(n)]


def _ring_sum(axes: tuple[str, ...], n: int):
  """The per-device `sum over my images i, all texts j` of the SigLIP terms, as a custom_vjp
  function of (zimg, ztxt, log_temperature, bias), all device-local (varying)."""
  bidir, extra = divmod(n - 1, 2)
  right, left = _shift(n, 1), _shift(n, -1)

  def foreign(zimg, zt, t, b):
    return siglip_loss.block_sum(zimg, zt, t, b, positive_diagonal=False)

  def forward(zimg, ztxt, t, b):
    total = siglip_loss.block_sum(zimg, ztxt, t, b, positive_diagonal=True)

    def step(_, carry):
      to_right, to_left, total = carry
      from_left = jax.lax.ppermute(to_right, axes, right)
      from_right = jax.lax.ppermute(to_left, axes, left)
      total = total + foreign(zimg, from_left, t, b) + foreign(zimg, from_right, t, b)
      return from_left, from_right, total

    to_right, _, total = jax.lax.fori_loop(0, bidir, step, (ztxt, ztxt, total))
    if extra:
      total = total + foreign(zimg, jax.lax.ppermute(to_right, axes, right), t, b)
    return total

  @jax.custom_vjp
  def ring_sum(zimg, ztxt, t, b):
    return forward(zimg, ztxt, t, b)

  def fwd(zimg, ztxt, t, b):
    return forward(zimg, ztxt, t, b), (zimg, ztxt, t, b)

  def bwd(res, g):
    zimg, ztxt, t, b = res

    def vjp(zt, positive):
      _, pull = jax.vjp(functools.partial(siglip_loss.block_sum, positive_diagonal=positive),
                        zimg, zt, t, b)
      return pull(g)

    d_img, d_txt, d_t, d_b = vjp(ztxt, True)
    d_img = d_img.astype(jnp.float32)
    zeros = jnp.zeros_like(d_txt, jnp.float32)  # device-varying, as the carry it starts

    def add(acc, terms):
      d_img, d_t, d_b = acc
      return (d_img + terms[0].astype(jnp.float32), d_t + terms[2], d_b + terms[3])

    def step(_, carry):
      (tr, gr), (tl, gl), acc = carry
      tr, gr = jax.lax.ppermute((tr, gr), axes, right)
      tl, gl = jax.lax.ppermute((tl, gl), axes, left)
      a, c = vjp(tr, False), vjp(tl, False)
      acc = add(add(acc, a), c)
      return (tr, gr + a[1].astype(jnp.float32)), (tl, gl + c[1].astype(jnp.float32)), acc

    (tr, gr), (_, gl), acc = jax.lax.fori_loop(
        0, bidir, step, ((ztxt, zeros), (ztxt, zeros), (d_img, d_t, d_b)))
    hops_right = bidir
    if extra:
      tr, gr = jax.lax.ppermute((tr, gr), axes, right)
      a = vjp(tr, False)
      acc = add(acc, a)
      gr = gr + a[1].astype(jnp.float32)
      hops_right += 1
    d_img, d_t, d_b = acc
    # Each accumulator goes home: the right-going one `hops_right` places back, the left-going
    # one `bidir` places forward.
    d_txt = d_txt.astype(jnp.float32)
    if hops_right:
      d_txt = d_txt + jax.lax.ppermute(gr, axes, _shift(n, -hops_right))
    if bidir:
      d_txt = d_txt + jax.lax.ppermute(gl, axes, _shift(n, bidir))
    return (d_img.astype(zimg.dtype), d_txt.astype(ztxt.dtype), d_t.astype(t.dtype),
            d_b.astype(b.dtype))

  ring_sum.defvjp(fwd, bwd)
  return ring_sum


def batch_axes(mesh: Mesh, rules, batch: int) -> tuple[str, ...]:
  """The mesh axes the batch's rows are split over (`act_batch` of the rules, those dividing
  `batch`, outermost first): the ring."""
  return row_axes(mesh, rules_lib.get_rules(rules), batch)


def siglip_loss_ring(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array, *,
                     mesh: Mesh, axes: Sequence[str] | None = None, rules='dp') -> Array:
  """`siglip_loss.siglip_loss` of the global batch, computed as a ring over `axes` (module
  docstring); same value and gradients.

  Args:
    zimg, ztxt: [B, D] global arrays, row i of each the same pair, split (or to be split) over
      `axes` on their first dimension.
    log_temperature, bias: fp32 scalars (replicated).
    mesh: the device mesh.
    axes: mesh axes of the ring, outermost first; None = `batch_axes(mesh, rules, B)`.
  Returns:
    the fp32 scalar loss, replicated.
  """
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f'zimg and ztxt must both be [B, D]; got {zimg.shape} and {ztxt.shape}')
  batch = zimg.shape[0]
  axes = tuple(batch_axes(mesh, rules, batch) if axes is None else axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'ring axes {unknown} are not mesh axes {mesh.axis_names}')
  n = math.prod(mesh.shape[a] for a in axes)
  if batch % n:
    raise ValueError(f'the batch of {batch} pairs does not split over the {n} devices of the '
                     f'ring axes {axes}')
  if n == 1:
    return siglip_loss.siglip_loss(zimg, ztxt, log_temperature, bias)
  ring_sum = _ring_sum(axes, n)
  rows = P(axes)

  def body(zimg, ztxt, t, b):
    t = jax.lax.pcast(t, axes, to='varying')
    b = jax.lax.pcast(b, axes, to='varying')
    return jax.lax.psum(ring_sum(zimg, ztxt, t, b), axes) / batch

  fn = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(log_temperature, jnp.float32),
            jnp.asarray(bias, jnp.float32))
