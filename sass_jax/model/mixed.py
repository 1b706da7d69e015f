"""Mixed-precision products: bfloat16 operands, float32 accumulation, in both passes.

With ``config.model.compute_dtype='bfloat16'`` the towers' activations and weights are cast to
bfloat16. A plain ``jnp.einsum`` of two bfloat16 arrays returns bfloat16, and XLA:CPU then
takes a slow path: on a CPU with AMX (measured on this project's 2-core machine, one core,
``[3, 4096, 528] x [3, 528, 256]``) a bfloat16 -> bfloat16 batched matmul ran at 73 GFLOP/s,
the same product accumulated in float32 (``preferred_element_type=float32``) at 716-727 GFLOP/s,
float32 operands at 135. JAX's own backward of an einsum with ``preferred_element_type``
multiplies a float32 cotangent by a bfloat16 operand, which XLA computes in float32.

``einsum(spec, a, b)`` computes the product with float32 accumulation and returns ``a``'s
dtype (bfloat16 in, bfloat16 out, as on a TPU's matrix unit), and its gradient products take
the bfloat16 cotangent and operands, again with float32 accumulation. For float32 operands it
is ``jnp.einsum``. The values equal ``jnp.einsum(spec, a, b, preferred_element_type=f32)``
rounded to bfloat16; ``tests/test_precision.py`` bounds the difference of a whole step's loss
and gradients to the float32 model.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """``jnp.einsum(spec, a, b)``; when both operands are bfloat16, accumulated in float32 in the
  forward and both gradient products (module docstring), returning bfloat16. Other dtypes
  (float32, or a mix, which promotes) are plain ``jnp.einsum``. For bfloat16, ``spec`` is an
  explicit two-operand einsum (``'ab,bc->ac'``) in which every index of an operand appears in
  the output or in the other operand (any matmul or batched matmul); raises ValueError
  otherwise."""
  if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
    return jnp.einsum(spec, a, b)
  _plan(spec)  # a bad spec fails here, before tracing
  return _einsum_bf16(spec, a, b)


class _Plan(NamedTuple):
  """A two-operand spec's indices by role: ``x``, ``y``, ``out`` (the operands' and the
  output's), ``batch`` (in all three, the output's order), ``contract`` (in both operands, not
  the output; x's order), ``free_x`` / ``free_y`` (in one operand only), and ``plain``: whether
  XLA:CPU has a bfloat16 x bfloat16 -> float32 kernel for the spec as it is (``_plain``)."""

  x: str
  y: str
  out: str
  batch: tuple[str, ...]
  contract: tuple[str, ...]
  free_x: tuple[str, ...]
  free_y: tuple[str, ...]
  plain: bool


@functools.lru_cache(maxsize=None)
def _plan(spec: str) -> _Plan:
  """The spec's ``_Plan``; raises ValueError for a spec ``einsum`` does not take."""
  ins, _, out = spec.replace(" ", "").partition("->")
  parts = ins.split(",")
  if not out or len(parts) != 2:
    raise ValueError(f"mixed.einsum: explicit two-operand spec expected, got {spec!r}")
  x, y = parts
  if len(set(x)) != len(x) or len(set(y)) != len(y) or len(set(out)) != len(out):
    raise ValueError(f"mixed.einsum: {spec!r}: an index repeated within one operand")
  if set(out) - set(x) - set(y):
    raise ValueError(f"mixed.einsum: {spec!r}: an output index in neither operand")
  for name, s, other in (("first", x, y), ("second", y, x)):
    if set(s) - set(out) - set(other):
      raise ValueError(
        f"mixed.einsum: {spec!r}: every index of the {name} operand must appear in the output "
        "or the other operand"
      )
  batch = tuple(c for c in out if c in x and c in y)
  free_x, free_y = tuple(c for c in x if c not in y), tuple(c for c in y if c not in x)
  contract = tuple(c for c in x if c in y and c not in out)
  plain = _plain(x, y, out, batch, free_x, free_y)
  return _Plan(x, y, out, batch, contract, free_x, free_y, plain)


def _plain(x: str, y: str, out: str, batch, free_x, free_y) -> bool:
  """Whether XLA:CPU runs ``jnp.einsum`` of this spec with bfloat16 operands and float32
  accumulation as it is (found by trial, ``tests/test_precision.py`` checks every form the
  model uses and more): the shared (batch) indices lead both operands and the output in one
  order; in each operand the rest is one run of free indices and one run of contracted ones;
  the output's rest is one operand's free indices, then the other's. Such a product skips the
  transposes of the canonical form: a weight gradient ``'kbo,kbi->kio'`` runs faster as it is
  (fine-tune step of ``configs/aliccp_scale.py``, batch 4096, two cores, one run each: 400 ms
  against 485 ms with every product in the canonical form; BENCHMARKS.md)."""
  nb = len(batch)
  if not (x[:nb] == y[:nb] == out[:nb] == "".join(batch)):
    return False
  for s, other in ((x, y), (y, x)):
    kinds = ["c" if c in other else "f" for c in s[nb:]]
    if sum(1 for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]) > 2:
      return False
  return out[nb:] in ("".join(free_x + free_y), "".join(free_y + free_x))


def _product(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """bfloat16 ``a``, ``b`` -> their einsum accumulated in float32, rounded to bfloat16.

  A spec XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for (``jnp.einsum('bki,kio->bko',
  ..., preferred_element_type=float32)`` fails at run time: "Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32") is computed as one batched matmul ``[batch, m, c] x
  [batch, c, n]`` (``[m, c] x [c, n]`` without batch indices) of operands transposed and
  reshaped to that form, the output transposed back; the others as they are."""
  p = _plan(spec)
  if p.plain:
    a, b, spec = _split_contraction(p, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  size = {**dict(zip(p.x, a.shape)), **dict(zip(p.y, b.shape))}
  n = lambda cs: math.prod(size[c] for c in cs)
  a3 = jnp.transpose(a, [p.x.index(c) for c in p.batch + p.free_x + p.contract])
  b3 = jnp.transpose(b, [p.y.index(c) for c in p.batch + p.contract + p.free_y])
  a3 = a3.reshape(n(p.batch), n(p.free_x), n(p.contract))
  b3 = b3.reshape(n(p.batch), n(p.contract), n(p.free_y))
  if p.batch:
    dims = (((2,), (1,)), ((0,), (0,)))
  else:  # a plain [m, c] x [c, n] (a batch of one is not on the fast path either)
    a3, b3, dims = a3[0], b3[0], (((1,), (0,)), ((), ()))
  y3 = jax.lax.dot_general(a3, b3, dims, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  order = p.batch + p.free_x + p.free_y
  return jnp.transpose(y3.reshape([size[c] for c in order]), [order.index(c) for c in p.out])


def _split_contraction(p: _Plan, a: jnp.ndarray, b: jnp.ndarray):
  """A plain spec whose first operand starts (after the batch indices) with a contracted index,
  e.g. a weight gradient ``'kbo,kbi->kio'`` (the rows b contracted): XLA:CPU folds any
  transpose of such an operand into the product and then computes it in float32 with a generic
  kernel, at about a quarter of the bfloat16 rate. With that index split in two (size n ->
  ``(2, n / 2)``, a reshape of both operands) the product contracts two indices; XLA then
  transposes the operands into its canonical form and runs its bfloat16 kernel: on this
  project's 2-core AMX machine ``[3, 4096, 256] x [3, 4096, 128] -> [3, 256, 128]`` took
  1.9 ms instead of 6.7, ``[18, 256, 256] x [18, 256, 128]`` 1.2 instead of 2.9 (jitted,
  medians of 15). Returns ``(a, b, spec)``: unchanged for other specs and for an odd size."""
  rest = p.x[len(p.batch) :]
  n = a.shape[len(p.batch)] if rest and rest[0] in p.contract else 1
  if n % 2:
    return a, b, f"{p.x},{p.y}->{p.out}"
  c = rest[0]
  i, j = p.x.index(c), p.y.index(c)
  new = next(ch for ch in "abcdefghijklmnopqrstuvwxyz" if ch not in p.x + p.y + p.out)
  a = a.reshape(a.shape[:i] + (2, n // 2) + a.shape[i + 1 :])
  b = b.reshape(b.shape[:j] + (2, n // 2) + b.shape[j + 1 :])
  x, y = p.x.replace(c, new + c), p.y.replace(c, new + c)
  return a, b, f"{x},{y}->{p.out}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_bf16(spec, a, b):
  return _product(spec, a, b)


def _einsum_bf16_fwd(spec, a, b):
  return _product(spec, a, b), (a, b)


def _einsum_bf16_bwd(spec, res, ct):
  a, b = res
  p = _plan(spec)
  ct = ct.astype(jnp.bfloat16)
  return _product(f"{p.out},{p.y}->{p.x}", ct, b), _product(f"{p.out},{p.x}->{p.y}", ct, a)


_einsum_bf16.defvjp(_einsum_bf16_fwd, _einsum_bf16_bwd)


def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x ``[..., d_in]`` times kernel ``[d_in, d_out]`` -> ``[..., d_out]`` through ``einsum``."""
  letters = "abcdefghijklmnopqrstuvw"[: x.ndim - 1]
  return einsum(f"{letters}y,yz->{letters}z", x, kernel)


def add_bias(y: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """``y + b`` (b broadcast against y's trailing axes) in ``y``'s dtype. For bfloat16 ``y`` the
  sum is taken in float32 (``b`` as given, float32 for a parameter) and rounded once, so b's
  gradient is a float32 sum of the cotangent. A bfloat16 bias gets a bfloat16 sum, which
  XLA:CPU computes as a tree of reduce-windows rounding after every add, up to 23 ms each for
  a ``[3, 4096, 256]`` cotangent on one core, where a float32 sum of it takes under 0.5 ms: the
  bfloat16 fine-tune step of ``configs/aliccp_scale.py`` (batch 4096, one core) went from 494
  to 407 ms with the biases added in float32 (BENCHMARKS.md). Other dtypes: plain ``y + b`` in
  y's dtype."""
  if y.dtype != jnp.bfloat16:
    return y + b.astype(y.dtype)
  return (y.astype(jnp.float32) + b.astype(jnp.float32)).astype(jnp.bfloat16)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``flax.linen.Dense``'s ``dot_general`` for x ``[..., d_in]`` times kernel ``[d_in, d_out]``
  (contracting x's last axis with the kernel's first, no batch axes) through ``einsum``;
  ``precision`` / ``preferred_element_type`` are accepted for the interface and must be None."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
    raise ValueError(f"mixed.dot_general: only x @ kernel is supported, got {dimension_numbers}")
  if precision is not None or preferred_element_type is not None:
    raise ValueError("mixed.dot_general: precision / preferred_element_type must be None")
  return matmul(lhs, rhs)
