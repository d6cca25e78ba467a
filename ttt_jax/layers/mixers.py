"""Sequence mixers: the protocol every mixer follows and the registry `model.mixer` names.

A sequence mixer mixes information along the sequence axis (attention, sliding-window attention,
the TTT layers); everything a block does around it (norms, MLP, residuals) is the same for all.
A mixer is an `nnx.Module` following `SequenceMixer`; the registry maps a `model.mixer` name to a
`MixerSpec`: the factory that builds it from the model's frozen config (models/config.py:
`ModelConfig`) plus the facts the rest of the package asks for (which parameters weight decay
applies to, how streamed chunks must be aligned, the config checks, the training metrics, an
optional conv branch the block runs before the mixer). No module outside the registrations
branches on a mixer name: the models, the optimizer, config validation and evaluation ask
`mixer_spec(name)`.

Built-in mixers: 'full' and 'swa' (layers/attention.py), 'ttt_linear' and 'ttt_mlp'
(layers/ttt_variants.py); `import ttt_jax.layers` registers them. Adding one (docs/architecture.md):
write the module, then `register_mixer(MixerSpec(name, build, ...))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections
from flax import nnx

from ttt_jax import config as config_lib
from ttt_jax.config import ConfigError

ConfigDict = ml_collections.ConfigDict
# What the registry's functions (build, pre_conv, alignment, metrics, attention_window) receive:
# the model's frozen config, models/config.py `ModelConfig` (made from `config.model` by
# `model_config`; typed Any here because layers do not import models).
ModelCfg = Any


@runtime_checkable
class SequenceMixer(Protocol):
  """`mixer(x [B, T, D], positions [T] int32, state, step) -> (y [B, T, D], new_state)`.

  `state=None` processes a fresh sequence in one shot and returns None as the new state; a
  state from `init_state(batch_size, capacity)` streams any length in chunks (KV window, TTT
  inner weights, ...), giving the one-shot outputs. `step` is the outer training step (mixers
  that warm up an inner learning rate read it; None = evaluation / generation); others ignore it.
  """

  def init_state(self, batch_size: int, capacity: int | None = None) -> Any: ...

  def __call__(self, x: jax.Array, positions: jax.Array, state: Any = None,
               step: jax.Array | int | None = None) -> tuple[jax.Array, Any]: ...


def _no_pre_conv(cfg: ModelCfg, **kw) -> None:
  del cfg, kw


def _aligned_to_1(cfg: ModelCfg) -> int:
  del cfg
  return 1


def _no_check(config: ConfigDict) -> None:
  del config


def _no_metrics(cfg: ModelCfg, step) -> dict:
  del cfg, step
  return {}


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """A registered sequence mixer and the facts the package asks about it."""

  name: str  # the model.mixer value
  # build(cfg, *, compute_dtype, param_dtype, rngs) -> SequenceMixer; cfg = the ModelConfig
  build: Callable[..., SequenceMixer]
  # parameter names (last path key) of the mixer's weight matrices: weight decay applies to them
  decayed: frozenset[str] = frozenset({"kernel"})
  # pre_conv(cfg, *, compute_dtype, param_dtype, rngs) -> a module run as h += conv(norm(h))
  # before the mixer (the TTT "Mamba backbone"), or None
  pre_conv: Callable[..., nnx.Module | None] = _no_pre_conv
  # streamed chunks must be whole multiples of alignment(cfg) tokens (TTT: the mini-batch)
  alignment: Callable[[ModelCfg], int] = _aligned_to_1
  # check(config) raises ConfigError for knobs this mixer cannot run with (whole config)
  check: Callable[[ConfigDict], None] = _no_check
  # metrics(cfg, step) -> extra training metrics (e.g. TTT's inner-LR multiplier)
  metrics: Callable[[ModelCfg, Any], dict] = _no_metrics
  # whether the streaming state grows with the context (full attention's KV cache) or is fixed
  state_grows: bool = False
  # attention mixers: attention_window(cfg) = how far back a query sees (None = the whole
  # prefix), for FLOP counts (train/flops.py); None for mixers that attend to no keys
  attention_window: Callable[[ModelCfg], int | None] | None = None


MIXERS: dict[str, MixerSpec] = {}
# TTT inner models by name (layers/ttt_inner.py: `InnerModel`, `register_inner_model`); kept here
# with the mixers so that one registry outlives re-executed layer modules (benchmarks/revisions.py)
INNER_MODELS: dict[str, Any] = {}


def register_mixer(spec: MixerSpec) -> MixerSpec:
  """Adds (or replaces) the mixer `spec.name`."""
  MIXERS[spec.name] = spec
  return spec


def mixer_names() -> tuple[str, ...]:
  return tuple(MIXERS)


def mixer_spec(name: str) -> MixerSpec:
  if name not in MIXERS:
    raise ConfigError(f"model.mixer={name!r} not allowed; choose one of: {', '.join(MIXERS)}")
  return MIXERS[name]


def check_mixer(config: ConfigDict) -> None:
  """Config check (run by `ttt_jax.config.validate`): model.mixer is registered and accepts
  the config."""
  mixer_spec(config.model.mixer).check(config)


if check_mixer not in config_lib.CHECKS:
  config_lib.CHECKS.append(check_mixer)
