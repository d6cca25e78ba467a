"""The TTT variants: the built-in inner models and their registration as sequence mixers.

A TTT variant is an inner model (layers/ttt_inner.py: `InnerModel`: its parameters, `predict`,
and the primal / dual mini-batch steps, optionally a whole-sequence dual form and Pallas
kernels) run by the shared TTT layer (layers/ttt.py: `TTTMixer`). `register_ttt_variant` adds
both the inner model and the mixer `model.mixer = 'ttt_' + name` with the facts the package
asks (weight decay of the inner weights, the Mamba-backbone pre-conv, mini-batch alignment,
config checks, the inner-LR multiplier metric). Built in: TTT-Linear ('ttt_linear') and
TTT-MLP ('ttt_mlp'); docs/ttt.md shows how to add one.
"""

from __future__ import annotations

import functools

import ml_collections

from ttt_jax.config import ConfigError
from ttt_jax.layers import ttt_dual, ttt_inner, ttt_pallas
from ttt_jax.layers.mixers import MixerSpec, register_mixer
from ttt_jax.layers.ttt import CausalConv, TTTMixer

LINEAR = ttt_inner.InnerModel(
    name="linear", layers=ttt_dual.LINEAR, widths=lambda d: (d, d),
    predict=ttt_inner.linear_predict, primal=ttt_inner.linear_primal,
    dual=ttt_inner.linear_dual, dual_sequence=ttt_dual.linear_sequence,
    pallas_sequence=ttt_pallas.linear_sequence,
    attrs=(("w", "w0"), ("b", "b0")))  # checkpoints name W0 w0 / b0
MLP = ttt_inner.InnerModel(
    name="mlp", layers=ttt_dual.MLP, widths=lambda d: (d, 4 * d, d),
    predict=ttt_inner.mlp_predict, primal=ttt_inner.mlp_primal, dual=ttt_inner.mlp_dual,
    dual_sequence=ttt_dual.mlp_sequence, pallas_step=ttt_pallas.mlp_step)


def pre_conv(cfg: ml_collections.ConfigDict, *, compute_dtype, param_dtype, rngs):
  """The "Mamba backbone"'s h += conv(norm(h)) before the TTT layer; None for 'base'."""
  if cfg.ttt.backbone != "mamba":
    return None
  return CausalConv(cfg.d_model, cfg.ttt.conv_width, axis="embed", compute_dtype=compute_dtype,
                    param_dtype=param_dtype, rngs=rngs)


def check_config(config: ml_collections.ConfigDict) -> None:
  b = config.model.ttt.mini_batch_size
  if config.data.seq_len % b:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be a multiple of "
                      f"model.ttt.mini_batch_size={b}")


def metrics(cfg: ml_collections.ConfigDict, step) -> dict:
  """The inner-LR multiplier at the outer step `step`."""
  return {"ttt_lr_mult": ttt_inner.warmup_lr_mult(step, cfg.ttt.lr_warmup_steps)}


def build(cfg: ml_collections.ConfigDict, *, inner: str, **kw) -> TTTMixer:
  """The TTT layer running the inner model `inner`; kw = compute_dtype, param_dtype, rngs."""
  return TTTMixer(cfg, inner=inner, **kw)


def register_ttt_variant(model: ttt_inner.InnerModel) -> MixerSpec:
  """Registers the inner model and the TTT mixer `model.mixer_name` that runs it."""
  ttt_inner.register_inner_model(model)
  return register_mixer(MixerSpec(
      name=model.mixer_name, build=functools.partial(build, inner=model.name),
      decayed=frozenset({"kernel"}) | model.weight_attrs, pre_conv=pre_conv,
      alignment=lambda cfg: cfg.ttt.mini_batch_size, check=check_config, metrics=metrics))


register_ttt_variant(LINEAR)
register_ttt_variant(MLP)
