"""A trained run opened read-only: its config, parameters and resolved data, for evaluation,
generation and test-time adaptation (`load_run`). Training's own start (fresh / resume / warm
start) is runs/resume.py; the checkpoint store is runs/checkpoint.py.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import ml_collections
from flax import nnx

from ttt_jax.config import ConfigError, base_config, validate
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.saved_tokenizer import load_saved_tokenizer
from ttt_jax.models import abstract_model
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.runs.workdir import TOKENIZER_DIR
from ttt_jax.sharding import make_mesh, param_shardings, rules_from_config


class Run(NamedTuple):
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  graphdef: Any
  params: Any
  data: Dataset  # the run's config.data, resolved once (tokenizer, validation split)


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config on top of today's defaults (knobs added since keep their default)."""
  config = base_config()
  known = ckpt.flat_config(config.to_dict())
  config.update_from_flattened_dict({k: v for k, v in ckpt.flat_config(saved).items()
                                     if k in known})
  # Any mesh works for restore; evaluate over every device (jax.devices(), parameters replicated).
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  return validate(config)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config + parameters + resolved data of a run's latest (or `step`) checkpoint, opened
  read-only."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir}: no such directory")
  directory = os.path.join(workdir, ckpt.CKPT_DIR)
  if not os.path.isdir(directory):
    raise ConfigError(f"--workdir {workdir}: no checkpoints directory {directory} "
                      "(train with scripts/train.py --workdir first)")
  checkpoints = ckpt.RunCheckpoints(directory, read_only=True)
  try:
    steps = checkpoints.steps()
    if not steps:
      raise ConfigError(f"--workdir {workdir}: no complete checkpoint in {directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"--step {step}: no such checkpoint in {directory}; available: "
                        f"{', '.join(map(str, steps))}")
    config = config_from_saved(checkpoints.saved_config(step))
    # resolved once; every evaluation receives it. The run's copy of its tokenizer stands in
    # where data.source or data.tokenizer no longer resolve (a data folder moved away).
    data = Dataset.from_config(config.data, functools.partial(
        load_saved_tokenizer, os.path.join(workdir, TOKENIZER_DIR)))
    data.sync_vocab(config)
    validate(config)
    graphdef, abstract = abstract_model(config.model, config.seed)
    shardings = param_shardings(abstract, make_mesh(config.mesh), rules_from_config(config))
    params = checkpoints.restore_params(step, config, nnx.to_pure_dict(abstract), shardings)
  finally:
    checkpoints.close()
  return Run(workdir, step, config, graphdef, params, data)
