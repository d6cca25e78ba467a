"""Command-line entry points (absl + ml_collections config flags); scripts/ call these."""

from __future__ import annotations

import sys


def train_main(argv=None) -> None:
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/pretrain.py:model=e2e,scale=tiny,ctx=2k",
      lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(_):
    from absl import logging  # noqa: PLC0415

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    from ttt_jax.config import ConfigError  # noqa: PLC0415
    from ttt_jax.train import distributed  # noqa: PLC0415
    from ttt_jax.train.checkpoint import CheckpointError  # noqa: PLC0415
    from ttt_jax.train.trainer import train_and_evaluate  # noqa: PLC0415

    try:
      distributed.initialize(config.value)  # before anything touches devices
      train_and_evaluate(config.value, workdir.value)
    except ConfigError as e:
      sys.exit(f"config error: {e}")
    except CheckpointError as e:
      sys.exit(f"checkpoint error: {e}")

  app.run(main, argv=argv)
