"""ttt_jax: long-context language-model pretraining with Test-Time Training in JAX/Flax.

The public API is the names in `__all__`, each loaded from its module on first use, so
`import ttt_jax` stays light (no JAX program is built, no submodule of substance imported) and
changes no global setting of JAX or Flax. Nothing inside the package imports these names from
here: modules import each other directly, in the order docs/architecture.md gives.

    import ttt_jax
    layer = ttt_jax.TTTMixer(ttt_jax.TTTConfig(d_model=256, num_heads=4, inner="linear"),
                             rngs=nnx.Rngs(0))                   # in your own NNX model
    cfg = ttt_jax.build_config("model=ttt_linear,scale=tiny,ctx=256")
    out = ttt_jax.train_and_evaluate(cfg, "runs/mine")          # or the whole training loop
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # configs
    "build_config": "ttt_jax.config", "validate": "ttt_jax.config",
    "ConfigError": "ttt_jax.config",
    # layers, for use in other models
    "Attention": "ttt_jax.layers.attention", "TTTMixer": "ttt_jax.layers.ttt",
    "TTTConfig": "ttt_jax.layers.ttt",
    "SequenceMixer": "ttt_jax.layers.mixers", "MixerSpec": "ttt_jax.layers.mixers",
    "register_mixer": "ttt_jax.layers.mixers", "InnerModel": "ttt_jax.layers.ttt_inner",
    "register_ttt_variant": "ttt_jax.layers.ttt_variants",
    # models
    "build_model": "ttt_jax.models", "LanguageModel": "ttt_jax.models.lm",
    "ModelConfig": "ttt_jax.models.config", "model_config": "ttt_jax.models.config",
    # training
    "Trainer": "ttt_jax.train.trainer", "train_and_evaluate": "ttt_jax.train.loop",
    # trained runs: loading, evaluation, generation
    "load_run": "ttt_jax.runs.load", "Generator": "ttt_jax.eval.generate",
    "generate_text": "ttt_jax.eval.generate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module 'ttt_jax' has no attribute {name!r}")
  # the layers register the built-in mixers and their config checks (config.CHECKS), which
  # `validate` runs: a config validated through this API is checked as a training run's is
  importlib.import_module("ttt_jax.layers")
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_API])
