"""A scan over chunks that carries sliding KV windows and keeps only each chunk's new slots for
its backward pass.

The E2E inner loop carries one KV window per suffix block from chunk to chunk: the last `cap`
keys and values of the stream (k, v [B, cap, ...], positions [cap]). Differentiated as a
rematerialised `lax.scan`, JAX keeps the carry of every trip for the backward pass: n windows of
`cap` slots per block, although window i+1 shares all but its newest slots with window i. At the
1b preset (8K, chunks of 1K, 8 sequences per GPU) those copies of keys and values take 3.5 GiB
per suffix block per GPU (7 chunks x 8 x 8K slots x 2 x 2,048 x 2 bytes).

`window_scan` gives the same values and derivatives of the same order. Its backward pass
rebuilds window i from the first window and the new slots of the chunks before it, by the rule
of the sliding-window attention (layers/attention.py):

  window_{i+1} = the last cap slots of (window_i ++ the chunk's keys)

so it keeps the first window and min(chunk, cap) slots per chunk instead of cap. Like the
rematerialised scan it keeps every trip's other carry (the inner weights) and recomputes each
trip's step forward in the backward pass; nothing else of a trip is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ttt_jax.layers.attention import KVCache
from ttt_jax.sharding import current_sharding, sharding_context

# step(consts, carry, windows, x) -> (carry, windows, y): one trip; windows a list of KVCache
Step = Callable[[Any, Any, list[KVCache], Any], tuple[Any, list[KVCache], Any]]


def _is_float(x) -> bool:  # float0 cotangents (of integer outputs) are not
  dtype = getattr(x, "dtype", None)
  return jnp.issubdtype(jnp.result_type(x) if dtype is None else dtype, jnp.inexact)


def _floats(tree) -> list:
  return [x for x in jax.tree.leaves(tree) if _is_float(x)]


def _fill(tree, floats, others_none: bool = False):
  """`tree` with its float leaves replaced by `floats` (in order); the others kept, or None."""
  it = iter(floats)
  leaves, treedef = jax.tree.flatten(tree)
  out = [next(it) if _is_float(x) else (None if others_none else x) for x in leaves]
  return jax.tree.unflatten(treedef, out)


def _new_slots(window: KVCache, m: int) -> KVCache:
  return KVCache(window.k[:, -m:], window.v[:, -m:], window.pos[-m:])


def _history(first: KVCache, slots: KVCache) -> KVCache:
  """first ++ every trip's new slots (slots stacked [n, ...]) along the slot axis."""
  def join(w, s, axis):
    s = jnp.moveaxis(s, 0, axis)  # [..., n, m, ...]
    return jnp.concatenate([w, s.reshape(*s.shape[:axis], -1, *s.shape[axis + 2:])], axis)
  return KVCache(join(first.k, slots.k, 1), join(first.v, slots.v, 1),
                 join(first.pos, slots.pos, 0))


def _window_at(history: KVCache, start, cap: int) -> KVCache:
  cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, cap, axis)  # noqa: E731
  return KVCache(cut(history.k, 1), cut(history.v, 1), cut(history.pos, 0))


def window_scan(step: Step, consts, carry, windows: list[KVCache], xs, *, chunk: int):
  """(carry_n, windows_n, ys): `jax.lax.scan` of `step` over the leading axis of `xs`.

  `step(consts, carry, windows, x)` must be pure and close over nothing traced (pass traced
  values in `consts`); each trip appends `chunk` keys to every window by the rule above.
  Differentiable once, in reverse mode, in `consts`, `carry`, `windows` and `xs` (the step itself
  may take gradients inside: the E2E inner gradient makes the outer gradient second order).
  `xs` has at least one trip.
  """
  caps = [w.pos.shape[0] for w in windows]
  keep = [min(chunk, cap) for cap in caps]
  # the backward pass is traced when the gradient is taken, after the caller's activation
  # sharding context has closed: it re-enters the one active here (so the step's constraints
  # keep the sequences split on a mesh in the recomputation too)
  context = current_sharding()

  def scan(consts, carry, windows, xs, keep_residuals: bool):
    """((carry_n, windows_n, ys), what the backward pass keeps: each trip's carry and the
    windows' new slots, or None)."""
    def body(c, x):
      new_carry, wins, y = step(consts, *c, x)
      if not keep_residuals:
        return (new_carry, wins), (y, None)
      slots = [_new_slots(w, m) for w, m in zip(wins, keep, strict=True)]
      return (new_carry, wins), (y, (c[0], slots))
    (carry_n, windows_n), (ys, kept) = jax.lax.scan(body, (carry, windows), xs)
    return (carry_n, windows_n, ys), kept

  @jax.custom_vjp
  def run(consts, carry, windows, xs):
    return scan(consts, carry, windows, xs, keep_residuals=False)[0]

  def fwd(consts, carry, windows, xs):
    out, (carries, slots) = scan(consts, carry, windows, xs, keep_residuals=True)
    return out, (consts, carries, windows, slots, xs)

  def bwd(res, cts):
    with sharding_context(context):
      return _bwd(res, cts)

  def _bwd(res, cts):
    consts, carries, first, slots, xs = res
    histories = [_history(w, s) for w, s in zip(first, slots, strict=True)]

    def back(acc, inp):
      d_consts, d_out = acc  # d_out: float cotangents of (carry, windows) after this trip
      i, carry, x, d_y = inp
      wins = [_window_at(h, i * m, cap) for h, m, cap in zip(histories, keep, caps, strict=True)]

      def trip(c, ca, w, xx):  # the step on float leaves only (positions, tokens stay fixed)
        out = step(_fill(consts, c), _fill(carry, ca), _fill(wins, w), _fill(x, xx))
        return _floats(out)

      _, vjp = jax.vjp(trip, _floats(consts), _floats(carry), _floats(wins), _floats(x))
      dc, d_carry, d_wins, dx = vjp(d_out + _floats(d_y))
      d_consts = [a + b.astype(a.dtype) for a, b in zip(d_consts, dc, strict=True)]
      return (d_consts, d_carry + d_wins), dx

    d_carry_n, d_windows_n, d_ys = cts
    n = jax.tree.leaves(xs)[0].shape[0]
    init = ([jnp.zeros(c.shape, c.dtype) for c in _floats(consts)],
            _floats(d_carry_n) + _floats(d_windows_n))
    (d_consts, d_in), dxs = jax.lax.scan(back, init, (jnp.arange(n), carries, xs, d_ys),
                                         reverse=True)
    carry0 = jax.tree.map(lambda c: c[0], carries)  # the structure of the carry
    n_carry = len(_floats(carry0))
    return (_fill(consts, d_consts, True), _fill(carry0, d_in[:n_carry], True),
            _fill(first, d_in[n_carry:], True), _fill(xs, dxs, True))

  def fwd_in_context(*args):
    with sharding_context(context):
      return fwd(*args)

  run.defvjp(fwd_in_context, bwd)
  return run(consts, carry, windows, xs)
