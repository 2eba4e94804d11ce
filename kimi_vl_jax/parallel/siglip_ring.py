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
blocks are seen in ceil((n - 1) / 2) steps (for even n, the last step goes one way only). A
device holds its own text block and the two in flight (in the backward each with its gradient
accumulator) and logits blocks of [B/n, B/n], never anything of size B; the loss is the `psum`
of the per-device sums divided by B. With a `valid` mask (packed batches' empty image
slots) the mask travels with the texts, pairs with a padding image or text count nothing and B is
the number of valid pairs.

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
gradients against the single-device loss for rings of 2, 3, 4, 5 and 8 devices and that no
compiled buffer has the global batch as a dimension.
"""

from __future__ import annotations

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
  function of (zimg, ztxt, log_temperature, bias, valid), all device-local (varying); `valid`
  (fp32 0 / 1 per pair) travels with the texts and gets a zero cotangent."""
  bidir, extra = divmod(n - 1, 2)
  right, left = _shift(n, 1), _shift(n, -1)

  def block(zimg, valid, zt, tv, t, b, positive=False):
    return siglip_loss.block_sum(zimg, zt, t, b, positive_diagonal=positive, img_valid=valid,
                                 txt_valid=tv)

  def forward(zimg, ztxt, t, b, valid):
    total = block(zimg, valid, ztxt, valid, t, b, positive=True)

    def step(_, carry):
      to_right, to_left, total = carry
      from_left = jax.lax.ppermute(to_right, axes, right)
      from_right = jax.lax.ppermute(to_left, axes, left)
      total = (total + block(zimg, valid, *from_left, t, b)
               + block(zimg, valid, *from_right, t, b))
      return from_left, from_right, total

    packet = (ztxt, valid)
    to_right, _, total = jax.lax.fori_loop(0, bidir, step, (packet, packet, total))
    if extra:
      total = total + block(zimg, valid, *jax.lax.ppermute(to_right, axes, right), t, b)
    return total

  @jax.custom_vjp
  def ring_sum(zimg, ztxt, t, b, valid):
    return forward(zimg, ztxt, t, b, valid)

  def fwd(zimg, ztxt, t, b, valid):
    return forward(zimg, ztxt, t, b, valid), (zimg, ztxt, t, b, valid)

  def bwd(res, g):
    zimg, ztxt, t, b, valid = res

    def vjp(zt, tv, positive):
      _, pull = jax.vjp(
          lambda zi, zt, t, b: block(zi, valid, zt, tv, t, b, positive), zimg, zt, t, b)
      return pull(g)

    d_img, d_txt, d_t, d_b = vjp(ztxt, valid, True)
    d_img = d_img.astype(jnp.float32)
    zeros = jnp.zeros_like(d_txt, jnp.float32)  # device-varying, as the carry it starts

    def add(acc, terms):
      d_img, d_t, d_b = acc
      return (d_img + terms[0].astype(jnp.float32), d_t + terms[2], d_b + terms[3])

    def step(_, carry):
      (tr, vr, gr), (tl, vl, gl), acc = carry
      tr, vr, gr = jax.lax.ppermute((tr, vr, gr), axes, right)
      tl, vl, gl = jax.lax.ppermute((tl, vl, gl), axes, left)
      a, c = vjp(tr, vr, False), vjp(tl, vl, False)
      acc = add(add(acc, a), c)
      return ((tr, vr, gr + a[1].astype(jnp.float32)), (tl, vl, gl + c[1].astype(jnp.float32)),
              acc)

    packet = (ztxt, valid, zeros)
    (tr, vr, gr), (_, _, gl), acc = jax.lax.fori_loop(
        0, bidir, step, (packet, packet, (d_img, d_t, d_b)))
    hops_right = bidir
    if extra:
      tr, vr, gr = jax.lax.ppermute((tr, vr, gr), axes, right)
      a = vjp(tr, vr, False)
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
            d_b.astype(b.dtype), jnp.zeros_like(valid))

  ring_sum.defvjp(fwd, bwd)
  return ring_sum


def batch_axes(mesh: Mesh, rules, batch: int) -> tuple[str, ...]:
  """The mesh axes the batch's rows are split over (`act_batch` of the rules, those dividing
  `batch`, outermost first): the ring."""
  return row_axes(mesh, rules_lib.get_rules(rules), batch)


def siglip_loss_ring(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array,
                     valid: Array | None = None, *, mesh: Mesh,
                     axes: Sequence[str] | None = None, rules='dp') -> Array:
  """`siglip_loss.siglip_loss` of the global batch, computed as a ring over `axes` (module
  docstring); same value and gradients.

  Args:
    zimg, ztxt: [B, D] global arrays, row i of each the same pair, split (or to be split) over
      `axes` on their first dimension.
    log_temperature, bias: fp32 scalars (replicated).
    valid: optional [B] mask of real pairs (packed batches' empty image slots are 0), split like
      the embeddings; it travels with the texts.
    mesh: the device mesh.
    axes: mesh axes of the ring, outermost first; None = `batch_axes(mesh, rules, B)`.
  Returns:
    the fp32 scalar loss, replicated.
  """
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f'zimg and ztxt must both be [B, D]; got {zimg.shape} and {ztxt.shape}')
  batch = zimg.shape[0]
  if valid is not None and valid.shape != (batch,):
    raise ValueError(f'valid must be [B={batch}]; got {valid.shape}')
  axes = tuple(batch_axes(mesh, rules, batch) if axes is None else axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'ring axes {unknown} are not mesh axes {mesh.axis_names}')
  n = math.prod(mesh.shape[a] for a in axes)
  if batch % n:
    raise ValueError(f'the batch of {batch} pairs does not split over the {n} devices of the '
                     f'ring axes {axes}')
  if n == 1:
    return siglip_loss.siglip_loss(zimg, ztxt, log_temperature, bias, valid)
  ring_sum = _ring_sum(axes, n)
  rows = P(axes)
  valid = (jnp.ones((batch,), jnp.float32) if valid is None
           else (jnp.asarray(valid) > 0).astype(jnp.float32))

  def body(zimg, ztxt, t, b, valid):
    t = jax.lax.pcast(t, axes, to='varying')
    b = jax.lax.pcast(b, axes, to='varying')
    count = jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1.0)
    return jax.lax.psum(ring_sum(zimg, ztxt, t, b, valid), axes) / count

  fn = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, P(), P(), rows), out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(log_temperature, jnp.float32),
            jnp.asarray(bias, jnp.float32), valid)
