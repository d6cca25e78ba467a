"""LoRA adapters added to a built model by module surgery.

`apply_lora(model, targets, rank, alpha)` replaces, in place, every targeted projection with a
wrapper that computes `x·W (+ bias) + s·(x·A)·B` with `s = alpha / rank`:
  * an `nnx.Linear` stored under a targeted attribute name (attention `wq/wk/wv/wo`; a TTT
    layer's `wq/wv/wo` plus `wk` (base backbone) or `wg` (Mamba backbone); any other
    projection a mixer keeps as an `nnx.Linear`) becomes a `LoRALinear`;
  * a block's `mlp` (`SwiGLU`) becomes a `LoRASwiGLU` when any of `w1/w2/w3` is targeted.
The wrappers hold the *same* base Variables under the same attribute names, so parameter paths
of the base model do not change (a base checkpoint loads into the adapted model as is) and the
adapter factors are the only new leaves, typed `LoRAParam` so `nnx.split(model, LoRAParam, ...)`
separates them from the frozen base. A is N(0, 1/d_in), B is zero: a fresh adapter is a no-op.
Stacked blocks (`model.scan_layers=True`) get factors with the same leading `layers` axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.common import const_init, normal_init
from ttt_jax.layers.mlp import SwiGLU

MLP_WEIGHTS = ("w1", "w2", "w3")
# Projection names used by this package's mixers; a known name that a model lacks (e.g. `wk` of a
# TTT layer with the Mamba backbone, which shares Q/K) is skipped, any other unknown name fails.
KNOWN_TARGETS = ("wq", "wk", "wv", "wo", "wg", *MLP_WEIGHTS)


class LoRAParam(nnx.Param):
  """A low-rank adapter factor (the only parameters test-time learning updates)."""


def _axis_names(var: nnx.Variable) -> tuple:
  names = var.get_metadata().get("out_sharding")
  if not names or len(names) != var[...].ndim:
    return (None,) * var[...].ndim
  return tuple(names)


class LoRADelta(nnx.Module):
  """The low-rank update s·(x·A)·B of one weight W [*lead, d_in, d_out]."""

  def __init__(self, weight: nnx.Variable, *, rank: int, alpha: float, rngs: nnx.Rngs):
    shape, dt = weight[...].shape, weight[...].dtype
    *lead, d_in, d_out = shape
    names = _axis_names(weight)
    lead_names, in_name, out_name = names[:-2], names[-2], names[-1]
    self.scale = float(alpha) / rank
    self.a = LoRAParam(normal_init(d_in ** -0.5, (*lead_names, in_name, None))(
        rngs.params(), (*lead, d_in, rank), dt))
    self.b = LoRAParam(const_init(0.0, (*lead_names, None, out_name))(
        rngs.params(), (*lead, rank, d_out), dt))

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    return self.scale * ((x @ a) @ b)


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """s·A·B, shaped like the weight it adapts (leading axes batched)."""
  return scale * jnp.einsum("...ir,...ro->...io", a, b)


class LoRALinear(nnx.Module):
  """`nnx.Linear` + LoRA: y = x·W (+ b) + s·(x·A)·B, computed unmerged."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    self.kernel = base.kernel
    self.bias = base.bias
    self.dtype = base.dtype
    self.lora = LoRADelta(base.kernel, rank=rank, alpha=alpha, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype if self.dtype is not None else jnp.result_type(x, self.kernel[...])
    x = x.astype(dt)
    y = x @ self.kernel[...].astype(dt)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    return y + self.lora(x)


class LoRASwiGLU(nnx.Module):
  """SwiGLU with LoRA on a subset of w1/w2/w3 (same computation as layers/mlp.py otherwise)."""

  def __init__(self, base: SwiGLU, targets: tuple[str, ...], *, rank: int, alpha: float,
               rngs: nnx.Rngs):
    self.compute_dtype = base.compute_dtype
    for name in MLP_WEIGHTS:
      setattr(self, name, getattr(base, name))
      delta = (LoRADelta(getattr(base, name), rank=rank, alpha=alpha, rngs=rngs)
               if name in targets else None)
      setattr(self, f"lora_{name}", delta)

  def _proj(self, x: jax.Array, name: str) -> jax.Array:
    y = x @ getattr(self, name)[...].astype(x.dtype)
    delta = getattr(self, f"lora_{name}")
    return y if delta is None else y + delta(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.compute_dtype)
    gate = jax.nn.silu(self._proj(x, "w1"))
    return self._proj(gate * self._proj(x, "w3"), "w2")


def lora_targets(model: nnx.Module) -> list[str]:
  """Target names this model offers: its `nnx.Linear` attribute names and w1/w2/w3 of `mlp`."""
  names: set[str] = set()
  for _, module in nnx.iter_modules(model):
    for name, value in vars(module).items():
      if isinstance(value, (nnx.Linear, LoRALinear)):
        names.add(name)
      elif name == "mlp" and isinstance(value, (SwiGLU, LoRASwiGLU)):
        names.update(MLP_WEIGHTS)
  return sorted(names)


def apply_lora(model: nnx.Module, targets: tuple[str, ...] | list[str], *, rank: int,
               alpha: float, seed: int = 0) -> list[str]:
  """Adds LoRA adapters to `model` in place. Returns the adapted module paths.

  Targets this model lacks but another kind has (KNOWN_TARGETS) are skipped; ValueError names
  any other unknown target, or all of them when none matches.
  """
  targets = tuple(targets)
  available = lora_targets(model)
  unknown = [t for t in targets if t not in available and t not in KNOWN_TARGETS]
  if unknown or not set(targets) & set(available):
    raise ValueError(f"LoRA target(s) {', '.join(unknown or targets)} not in this model; "
                     f"available: {', '.join(available)}")
  rngs = nnx.Rngs(params=seed)
  mlp_targets = tuple(t for t in MLP_WEIGHTS if t in targets)
  edits = []
  for path, module in nnx.iter_modules(model):
    for name, value in list(vars(module).items()):
      if isinstance(value, nnx.Linear) and name in targets:
        edits.append((path, module, name, value))
      elif name == "mlp" and isinstance(value, SwiGLU) and mlp_targets:
        edits.append((path, module, name, value))
  done = []
  for path, module, name, value in sorted(edits, key=lambda e: (tuple(map(str, e[0])), e[2])):
    if isinstance(value, SwiGLU):
      wrapped = LoRASwiGLU(value, mlp_targets, rank=rank, alpha=alpha, rngs=rngs)
    else:
      wrapped = LoRALinear(value, rank=rank, alpha=alpha, rngs=rngs)
    setattr(module, name, wrapped)
    done.append("/".join(map(str, (*path, name))))
  return done


def _merge_into(params: dict, lora: dict, scale: float) -> dict:
  out = dict(params)
  for key, sub in lora.items():
    if isinstance(sub, dict) and set(sub) == {"a", "b"} and isinstance(key, str) and (
        key == "lora" or key.startswith("lora_")):
      target = "kernel" if key == "lora" else key[len("lora_"):]
      w = params[target]
      out[target] = (w + lora_delta(sub["a"], sub["b"], scale).astype(w.dtype)).astype(w.dtype)
    elif isinstance(sub, dict):
      out[key] = _merge_into(params[key], sub, scale)
  return out


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
  """Base parameters (pure dict) with every adapter folded in: W ← W + s·A·B.

  `lora` is the pure dict of the LoRAParam leaves of an adapted model (same paths); the result
  has the base model's structure, so the plain model runs it with no adapter code.
  """
  return _merge_into(params, lora, scale)
