"""Where a training run starts: fresh, resumed from its own checkpoints, or with the parameters
of another run (`checkpoint.load_part=params`).

Resuming restores the latest complete step (or `checkpoint.step`) with the Trainer's shardings;
`checkpoint.load_step` is the other run's step that `load_part=params` takes, so a warm-started
run relaunched with the same command resumes its own latest step.
steps without completion markers, and with `checkpoint.step` the steps after it, are moved to
`<workdir>/checkpoints_discarded/` so the run continues from the chosen step. The checkpoint
store itself is runs/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from ttt_jax.config import ConfigError
from ttt_jax.runs.checkpoint import (
  CKPT_DIR,
  DISCARDED_DIR,
  CheckpointError,
  RunCheckpoints,
  config_diff,
  flat_config,
  load_from_dir,
  log_main,
  sync_processes,
)
from ttt_jax.runs.integrity import ChecksumMismatch


@dataclasses.dataclass
class RunStart:
  """Where a run starts: its checkpoints (None without a workdir), state and data position."""

  checkpoints: RunCheckpoints | None
  state: Any
  data_state: dict | None
  step: int


def _choose_step(ck: RunCheckpoints, wanted: int, key: str = "checkpoint.step") -> int:
  steps = ck.steps()
  if wanted < 0:
    return steps[-1]
  if wanted not in steps:
    raise CheckpointError(f"{key}={wanted} not found in {ck.directory}; available: "
                          f"{', '.join(map(str, steps))}")
  return wanted


def _move_aside(ck: RunCheckpoints, workdir: str, steps: list[int]) -> str:
  """Moves step directories to `<workdir>/checkpoints_discarded/` (process 0; all sync)."""
  dest = os.path.join(workdir, DISCARDED_DIR)
  if jax.process_index() == 0:
    os.makedirs(dest, exist_ok=True)
    for s in steps:
      target = os.path.join(dest, str(s))
      n = 1
      while os.path.exists(target):
        target, n = os.path.join(dest, f"{s}.{n}"), n + 1
      shutil.move(ck.step_path(s), target)
  sync_processes("ttt_jax_discard_checkpoints")
  ck.reload()
  return dest


def _discard_after(ck: RunCheckpoints, workdir: str, step: int, echo) -> None:
  """Moves checkpoints later than `step` aside so that the run continues from `step`."""
  later = [s for s in ck.steps() if s > step]
  if not later:
    return
  dest = _move_aside(ck, workdir, later)
  log_main(echo, f"warning: resuming from step {step} as requested; moved later checkpoints "
                 f"{later} to {dest}")


ROLLBACK_FILE = "rollback.json"  # in <workdir>: the step the last checkpoint.step rollback chose


def _rolled_back_to(workdir: str) -> int | None:
  try:
    with open(os.path.join(workdir, ROLLBACK_FILE)) as f:
      return int(json.load(f)["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _record_rollback(workdir: str, step: int) -> None:
  """Remembers a rollback, so a requeued job that repeats `checkpoint.step=N` continues from
  the steps trained since instead of discarding them again."""
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, ROLLBACK_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"step": int(step)}, f)
    os.replace(tmp, os.path.join(workdir, ROLLBACK_FILE))


def _discard_unmarked(ck: RunCheckpoints, workdir: str, echo) -> None:
  """Moves step directories without completion markers aside (one notice each): Orbax would
  otherwise restore them as complete and never save over their step again."""
  unmarked = ck.unmarked_steps()
  if not unmarked:
    return
  notices = [ck.unmarked_notice(s, "resuming from") for s in unmarked]
  dest = _move_aside(ck, workdir, unmarked)
  for notice in notices:
    log_main(echo, f"{notice} (moved to {dest})")


def _restore_intact(ck: RunCheckpoints, workdir: str, step: int, trainer, wanted: int, echo):
  """(step, restored) of the latest step whose arrays match their checksums: a damaged latest
  step is moved aside with a notice and the one before it restored (a step asked for with
  checkpoint.step, or the only one, fails in one line instead)."""
  while True:
    try:
      return step, ck.restore(step, trainer)
    except ChecksumMismatch as e:
      earlier = [s for s in ck.steps() if s < step]
      if wanted >= 0 or not earlier:
        raise
      dest = _move_aside(ck, workdir, [step])
      log_main(echo, f"warning: {e.damage}; moved it to {dest}, resuming from step {earlier[-1]}")
      step = earlier[-1]


MODEL_IDENTITY = ("model.kind", "model.mixer")  # what makes a run the model it is


def _check_same_model(saved: dict, config: ml_collections.ConfigDict, workdir: str,
                      step: int) -> None:
  """ConfigError when the config names another model than the run being resumed (a different
  kind or mixer with the same parameter shapes would load and train on as that model)."""
  if config.checkpoint.allow_model_change:
    return
  was, now = flat_config(saved), flat_config(config.to_dict())
  diff = [f"{k}: {was[k]!r} -> {now[k]!r}" for k in MODEL_IDENTITY if k in was and was[k] != now[k]]
  if diff:
    raise ConfigError(
        f"{workdir} holds a run of another model (checkpoint step {step}; {'; '.join(diff)}): "
        "resume it with its own model, start a new run in another --workdir "
        "(checkpoint.load_part=params takes its parameters), or set "
        "checkpoint.allow_model_change=True to continue it as this model")


def start_run(config: ml_collections.ConfigDict, workdir: str | None, trainer,
              echo=print) -> RunStart:
  """Fresh state, or resume from the latest complete checkpoint, or params from another run."""
  ckc = config.checkpoint
  if workdir is None:
    return RunStart(None, _fresh_or_loaded(config, trainer, echo), None, 0)
  directory = os.path.join(workdir, CKPT_DIR)
  for path in RunCheckpoints.incomplete(directory):
    log_main(echo, f"removing incomplete checkpoint {path} (a save that did not finish)")
  ck: RunCheckpoints | None = RunCheckpoints(directory, keep=ckc.keep)
  try:
    _discard_unmarked(ck, workdir, echo)
    if ck.steps() and not ckc.resume:
      closed, ck = ck, None
      closed.close()
      _start_over(closed, config, workdir, echo)
      ck = RunCheckpoints(directory, keep=ckc.keep)
    if ck.steps():
      return _resume(ck, config, workdir, trainer, echo)
    return RunStart(ck, _fresh_or_loaded(config, trainer, echo), None, 0)
  except BaseException:  # no checkpoint manager (nor its threads) outlives a failed start
    if ck is not None:
      ck.close()
    raise


def _start_over(ck: RunCheckpoints, config: ml_collections.ConfigDict, workdir: str,
                echo) -> None:
  """checkpoint.resume=False on a run with checkpoints: refused, or with checkpoint.overwrite
  the checkpoints, metrics.jsonl and the rollback record are deleted."""
  if not config.checkpoint.overwrite:
    raise ConfigError(
        f"{workdir} already holds a run (checkpoints up to step {ck.latest_step()}) and "
        "checkpoint.resume=False; set checkpoint.resume=True to continue it or "
        "checkpoint.overwrite=True to delete it and start over")
  if jax.process_index() == 0:
    shutil.rmtree(ck.directory)
    for name in ("metrics.jsonl", ROLLBACK_FILE):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
  sync_processes("ttt_jax_overwrite")
  log_main(echo, "checkpoint.overwrite=True: deleted the previous run's checkpoints in "
                 f"{ck.directory}")


def _resume(ck: RunCheckpoints, config: ml_collections.ConfigDict, workdir: str, trainer,
            echo) -> RunStart:
  """The run restored from its latest intact step (or checkpoint.step)."""
  wanted = config.checkpoint.step
  if wanted >= 0 and _rolled_back_to(workdir) == wanted and ck.latest_step() > wanted:
    log_main(echo, f"checkpoint.step={wanted}: this workdir was rolled back to step {wanted} "
                   f"by an earlier launch; continuing from its latest step {ck.latest_step()}"
                   " (drop the flag to silence this)")
    wanted = -1
  step = _choose_step(ck, wanted)
  _check_same_model(ck.saved_config(step), config, workdir, step)
  step, (state, data_state, saved) = _restore_intact(ck, workdir, step, trainer, wanted, echo)
  if wanted >= 0:
    _discard_after(ck, workdir, step, echo)
    _record_rollback(workdir, step)
  log_main(echo, f"resumed from step {step} ({ck.step_path(step)})")
  changed = [d for d in config_diff(saved, config.to_dict()) if not d.startswith("checkpoint.")]
  if changed:
    log_main(echo, f"note: config changed since the checkpoint: {'; '.join(changed)}")
  old = saved.get("data", {}).get("batch_size")
  return RunStart(ck, state, rebatched(data_state, old, config.data.batch_size, echo), step)


def rebatched(data_state: dict | None, old: int | None, new: int, echo=print) -> dict | None:
  """The data position after `data.batch_size` changed from `old` to `new`: the iterator counts
  batches, so the windows read so far are counted again in batches of the new size (rounded up
  to a whole batch: fewer than one batch of windows skipped, and said). The same processes read
  the same slices of the windows (`Trainer.data_shard`), so each continues where it stopped."""
  index = (data_state or {}).get("next_index")
  if old in (None, new) or not isinstance(index, int):
    return data_state
  read = index * old
  start = -(-read // new)
  skipped = start * new - read
  log_main(echo, f"data.batch_size changed from {old} to {new}: the data continues after the "
                 f"{read} windows read so far" + (f" ({skipped} skipped, to start a whole batch)"
                                                  if skipped else ""))
  return dict(data_state, next_index=start)


def _fresh_or_loaded(config: ml_collections.ConfigDict, trainer, echo):
  ckc = config.checkpoint
  state = trainer.init_state()
  if ckc.load_part != "params":
    return state
  src = ckc.load_from
  if ckc.step >= 0:  # before load_step existed, checkpoint.step chose load_from's step
    raise ConfigError(f"checkpoint.step={ckc.step} is this run's own resume step and it has no "
                      f"checkpoint yet; to take step {ckc.step} of checkpoint.load_from use "
                      f"checkpoint.load_step={ckc.step}")
  directory = load_from_dir(src)
  if not os.path.isdir(directory):
    raise ConfigError(f"checkpoint.load_from={src!r}: no checkpoints directory {directory}")
  other = RunCheckpoints(directory, read_only=True, echo=echo)
  try:
    if not other.steps():
      raise ConfigError(f"checkpoint.load_from={src!r}: no complete checkpoint in {directory}")
    step = _choose_step(other, ckc.load_step, "checkpoint.load_step")
    params = other.restore_params(step, trainer.config, trainer.abstract_params,
                                  trainer.state_shardings.params)
  finally:
    other.close()
  log_main(echo, f"loaded params from step {step} of {directory} (new optimizer state, step 0)")
  return state.replace(params=params)
