"""Small building blocks shared by the vision tower and the language model.

Every parameter is created through `param_with_axes`, which attaches logical axis names
(`nn.with_logical_partitioning`); `parallel/rules.py` maps those names to mesh axes. No module here
knows the mesh.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    dtype, axes: Sequence[str | None]) -> Array:
  """Declares a parameter with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f'{name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}')
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh + rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))


class DenseGeneral(nn.Module):
  """`y = einsum(x, kernel) + bias` over the last `len(in_features)` axes of x.

  kernel shape = in_features + out_features, e.g. `[D, N, H]` for a per-head projection.
  """
  in_features: tuple[int, ...]
  out_features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = len(self.in_features), len(self.out_features)
    kernel = param_with_axes(self, 'kernel', self.kernel_init,
                             self.in_features + self.out_features, self.param_dtype,
                             self.kernel_axes)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', nn.initializers.zeros, self.out_features,
                             self.param_dtype, self.kernel_axes[n_in:])
      y = y + bias.astype(self.dtype)
    del n_out
    return y


class _Norm(nn.Module):
  """Shared fields of the two norms: a per-feature `scale` (and `bias`) on logical axis
  `axis_name`."""
  features: int
  eps: float = 1e-6
  axis_name: str = 'norm'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _vector(self, name: str, init: Initializer) -> Array:
    return param_with_axes(self, name, init, (self.features,), self.param_dtype,
                           (self.axis_name,))


class RMSNorm(_Norm):
  """RMSNorm computed in fp32 (as DeepSeek-V3's reference does), param `scale`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self._vector('scale', nn.initializers.ones)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # The reference casts back to the input dtype before multiplying by the weight.
    return scale.astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(_Norm):
  """LayerNorm with `scale` and `bias`, statistics in fp32 (default eps 1e-5)."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self._vector('scale', nn.initializers.ones)
    bias = self._vector('bias', nn.initializers.zeros)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def apply_rope_interleaved(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x [..., H] pairwise: complex slot j is the real pair (2j, 2j+1) (DeepSeek's and
  MoonViT's `view_as_complex` layout, not rotate-half). cos, sin broadcast against x[..., ::2];
  computed in fp32, cast back to x's dtype."""
  xf = x.astype(jnp.float32)
  x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
  out = jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_erf(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {'gelu_pytorch_tanh': gelu_tanh, 'gelu_tanh': gelu_tanh, 'gelu': gelu_erf,
               'silu': jax.nn.silu}


def remat_policy(name: str):
  """Maps a config string to a `jax.checkpoint` policy; None means no remat at all."""
  if name == 'none':
    return None
  if name == 'full':
    return jax.checkpoint_policies.nothing_saveable
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f'unknown remat policy {name!r}: use none, full, or a name in '
                     'jax.checkpoint_policies')
  return policy


def layer_stack(layer: type[nn.Module], args: tuple, *, length: int, scan: bool, remat: str,
                broadcast: int, scanned: int = 0, name: str | None = None):
  """`length` copies of `layer(*args)`, optionally rematerialised with the `remat` policy.

  scan: one `nn.scan` module whose params carry a leading layer axis (logical name 'layers') and
  whose call broadcasts its next `broadcast` arguments (after the carry) to every layer and
  slices the `scanned` arguments after those along axis 0 (one slice per layer, e.g. a
  per-layer KV cache); else a list of layers (named `{name}_{i}`; inside `setup`, name=None lets
  the attribute name them).
  """
  if remat != 'none':
    layer = nn.remat(layer, policy=remat_policy(remat), prevent_cse=not scan)
  if not scan:
    return [layer(*args, name=None if name is None else f'{name}_{i}') for i in range(length)]
  scanned = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=(nn.broadcast,) * broadcast + (0,) * scanned, length=length,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  return scanned(*args, name=name)


class Einsum(nn.Module):
  """A parameter `kernel` of `shape` applied with an explicit einsum equation (gemma's `Einsum`).

  `Einsum(shape, axes, name='q_proj')('BTD,DNH->BTNH', x)` keeps the shapes readable at the call
  site; x and the kernel are cast to `dtype` and the product accumulates in that dtype (or in
  `preferred_element_type` if given, e.g. fp32 logits).
  """
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, eqn: str, x: Array, preferred_element_type=None) -> Array:
    kernel = param_with_axes(self, 'kernel', self.kernel_init, self.shape, self.param_dtype,
                             self.axes)
    return jnp.einsum(eqn, x.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=preferred_element_type)
