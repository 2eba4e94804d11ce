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


class RMSNorm(nn.Module):
  """RMSNorm computed in fp32 (as DeepSeek-V3's reference does), param `scale`."""
  features: int
  eps: float = 1e-6
  axis_name: str = 'norm'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (self.features,),
                            self.param_dtype, (self.axis_name,))
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # The reference casts back to the input dtype before multiplying by the weight.
    return scale.astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with `scale` and `bias`, statistics in fp32."""
  features: int
  eps: float = 1e-5
  axis_name: str = 'norm'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (self.features,),
                            self.param_dtype, (self.axis_name,))
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (self.features,),
                           self.param_dtype, (self.axis_name,))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


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
