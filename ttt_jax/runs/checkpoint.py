"""Orbax checkpoints of a training run: exact resume, params-only warm start, clear failures.

Layout: `<workdir>/checkpoints/<step>/`, one directory per saved step, with the items
  params  the parameter dict (arrays; restored with the Trainer's shardings, so any mesh works)
  train   {"step", "opt_state"} (older checkpoints also hold "rng", which restore reads past)
  data    the grain iterator state (JSON), so the data order continues exactly
  config  the resolved config (JSON)
  checksums  a CRC-32 per array of params and train (JSON; runs/integrity.py), checked on restore
Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it when complete, so
a crash mid-save leaves the earlier checkpoints usable; such leftovers are reported and skipped,
and a writable opening removes them before Orbax starts.
Before the rename it writes the step's completion markers (`commit_success.txt` and the commit
time in `_CHECKPOINT_METADATA`); a step directory without them (an interrupted copy or sync of a
run directory) is skipped with a notice, and a resumed run moves it aside.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ttt_jax.config import ConfigError
from ttt_jax.runs import integrity
from ttt_jax.runs.diskspace import check_space, quiet_disk_full_noise, tree_bytes
from ttt_jax.runs.integrity import CheckpointError, key_name
from ttt_jax.runs.legacy import current_shapes, former_names, rename_keys, undo

CKPT_DIR = "checkpoints"
DISCARDED_DIR = "checkpoints_discarded"
TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"  # Orbax's completion markers of a step directory
STEP_METADATA = "_CHECKPOINT_METADATA"
_ITEMS = {"params": "standard", "train": "standard", "data": "json", "config": "json",
          integrity.CHECKSUMS: "json"}
# Leaves of the `train` item that older checkpoints hold and the train state no longer has:
# `rng` (a PRNG key that was seeded and saved but never read).
LEGACY_TRAIN_LEAVES = ("rng",)


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's 'Given directory is read only' warning: evaluation opens checkpoints
  read-only on purpose, so the line tells a user nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_NOTICE = _ReadOnlyNotice()


def is_complete_step(path: str) -> bool:
  """True if a step directory carries Orbax's completion markers: `commit_success.txt` and a
  commit time in `_CHECKPOINT_METADATA` (both written just before the final rename)."""
  if not os.path.isfile(os.path.join(path, COMMIT_FILE)):
    return False
  try:
    with open(os.path.join(path, STEP_METADATA), encoding="utf-8") as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError, AttributeError):
    return False


def complete_steps(directory: str) -> list[int]:
  """The complete steps in a checkpoints directory, read from disk (oldest first)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and is_complete_step(os.path.join(directory, n)))


def kept_after_disk_full(directory: str) -> str:
  """What a run stopped by a full disk keeps of its checkpoints `directory`, and how to go on."""
  steps = complete_steps(directory)
  if not steps:
    return "no checkpoint was written yet: free space there and rerun"
  older = (f" (e.g. the older steps {', '.join(map(str, steps[:-1]))} in {directory} can go)"
           if len(steps) > 1 else "")
  return (f"the last checkpoint, step {steps[-1]} ({os.path.join(directory, str(steps[-1]))}), "
          f"is kept: free space there{older} and rerun the same command to resume from it")


def log_main(echo, msg: str) -> None:
  """`echo(msg)` on process 0 only."""
  if jax.process_index() == 0:
    echo(msg)


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr)


def sync_processes(name: str) -> None:
  """Barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for name, kind in _ITEMS.items():
    if kind == "standard":
      reg.add(name, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
      reg.add(name, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    else:
      reg.add(name, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
      reg.add(name, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return reg


def shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_name(p): tuple(x.shape) for p, x in leaves}


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(saved: dict, config: dict, prefix: str = "") -> list[str]:
  """'key: saved -> now' for every leaf that differs (restricted to keys starting with prefix)."""
  a, b = flat_config(saved), flat_config(config)
  keys = sorted(k for k in set(a) | set(b) if k.startswith(prefix))
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys
          if a.get(k) != b.get(k)]


def check_param_shapes(saved: dict[str, tuple], expected: dict[str, tuple], where: str,
                       model_diff: list[str]) -> None:
  """Raises CheckpointError naming the first parameter whose name or shape does not match."""
  hint = f"; model config differs: {', '.join(model_diff)}" if model_diff else ""
  layout = [d for d in model_diff if d.startswith("model.scan_layers:")]
  if layout:  # e.g. a run saved as a list of blocks, resumed with a preset that stacks them
    saved_layout = layout[0].split(": ", 1)[1].split(" -> ")[0]
    hint += (f" (the blocks' layout is fixed for a run: pass "
             f"--config.model.scan_layers={saved_layout} to load it)")
  for name, shape in expected.items():
    if name not in saved:
      raise CheckpointError(f"{where} has no parameter {name!r} (the config expects shape "
                            f"{shape}){hint}")
    if tuple(saved[name]) != shape:
      raise CheckpointError(f"parameter {name!r} has shape {tuple(saved[name])} in {where} but "
                            f"{shape} in this config{hint}")
  extra = sorted(set(saved) - set(expected))
  if extra:
    raise CheckpointError(f"{where} has parameter {extra[0]!r} that this config does not "
                          f"(and {len(extra) - 1} more){hint}")


class RunCheckpoints:
  """The checkpoints of one run directory (`<workdir>/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False,
               async_save: bool = True, echo=None):
    """`echo` (default: stderr) gets a notice for each step skipped for lack of completion
    markers when opened `read_only` (a writable opening leaves them to `start_run`)."""
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:  # Orbax logs through absl's logger; filtered from here on (added once)
      logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)
    else:
      quiet_disk_full_noise()  # a full disk during a save is reported in one line
      if jax.process_index() == 0:  # leftovers of unfinished saves, removed here and now (Orbax
        for path in self.incomplete(self.directory):  # does it in a thread nothing waits for)
          shutil.rmtree(path, ignore_errors=True)
      sync_processes("ttt_jax_remove_incomplete")
    opts = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep) if not read_only else None,
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        save_interval_steps=0 if read_only else 1)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts,
                                       handler_registry=_registry())
    if read_only:
      for step in self.unmarked_steps():
        log_main(echo or _stderr, self.unmarked_notice(step, "using"))

  def unmarked_notice(self, step: int, verb: str) -> str:
    earlier = [s for s in self.steps() if s < step]
    then = f"{verb} step {earlier[-1]}" if earlier else "no earlier complete step"
    return (f"skipping checkpoint step {step} ({self.step_path(step)}): its completion markers "
            f"({COMMIT_FILE}, commit time in {STEP_METADATA}) are missing, so its save or a copy "
            f"of it did not finish; {then}")

  # -- what is on disk -----------------------------------------------------------------------
  @staticmethod
  def incomplete(directory: str) -> list[str]:
    """Leftover directories of saves that never finished (skipped by restore)."""
    if not os.path.isdir(directory):
      return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if TMP_MARKER in n)

  def unmarked_steps(self) -> list[int]:
    """Step directories without completion markers (not usable; see `is_complete_step`)."""
    return sorted(s for s in self._mngr.all_steps() if not is_complete_step(self.step_path(s)))

  def steps(self) -> list[int]:
    """The complete steps, oldest first."""
    return sorted(s for s in self._mngr.all_steps() if is_complete_step(self.step_path(s)))

  def latest_step(self) -> int | None:
    s = self.steps()
    return s[-1] if s else None

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _where(self, step: int) -> str:
    return f"checkpoint step {step} ({self.step_path(step)})"

  def _unreadable(self, step: int, err: Exception) -> CheckpointError:
    if not os.path.isdir(self.step_path(step)):  # rotated away (checkpoint.keep) while read
      return CheckpointError(
          f"{self._where(step)} was removed while it was being read: the run training in this "
          "workdir rotated it away (checkpoint.keep); nothing is damaged, retry")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return CheckpointError(f"{self._where(step)} could not be read, it may be corrupted "
                           f"({type(err).__name__}: {first}); {self._way_out(step)}")

  def _way_out(self, step: int) -> str:
    """What to do instead of using `step`: the earlier steps (or starting over)."""
    earlier = ", ".join(str(s) for s in self.steps() if s < step)
    if self.read_only:
      return (f"an earlier step may be intact (available: {earlier}; --step N chooses one, "
              "checkpoint.load_step=N for load_from)" if earlier else
              "no earlier checkpoint exists")
    return (f"resume from an earlier step with --config.checkpoint.step=N (available: {earlier})"
            if earlier else "no earlier checkpoint exists; start over with "
            "--config.checkpoint.resume=False --config.checkpoint.overwrite=True")

  def saved_config(self, step: int) -> dict:
    return dict(self._restore(step, config=None)["config"])

  def saved_data_state(self, step: int) -> dict:
    return dict(self._restore(step, data=None)["data"] or {})

  def param_shapes(self, step: int) -> dict[str, tuple]:
    try:
      md = self._mngr.item_metadata(step)["params"]
      return shapes_by_name(getattr(md, "tree", md))
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e

  # -- save / restore ----------------------------------------------------------------------------
  def save(self, step: int, state, data_state: dict | None, config: ml_collections.ConfigDict,
           *, wait: bool = False) -> bool:
    """Saves (collectively, on every process); async unless `wait`. Skips an existing step.
    A save starts only when the bytes of its arrays are free on the device (else DiskFull, the
    earlier checkpoints untouched); the one before it has finished by then."""
    if step in self._mngr.all_steps():
      return False
    self._mngr.wait_until_finished()  # (Orbax's save waits for it too)
    check_space(self.directory, tree_bytes((state.params, state.opt_state)),
                f"checkpoint step {step}")
    arrays = {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state}}
    args = ocp.args.Composite(
        **{k: ocp.args.StandardSave(v) for k, v in arrays.items()},
        data=ocp.args.JsonSave(data_state or {}), config=ocp.args.JsonSave(config.to_dict()),
        **{integrity.CHECKSUMS: integrity.save_arg(arrays)})
    saved = self._mngr.save(step, args=args, force=True)
    if wait:
      self._mngr.wait_until_finished()
    return saved

  def check_model(self, step: int, config: ml_collections.ConfigDict, abstract_params,
                  saved_cfg: dict | None = None) -> None:
    saved_cfg = self.saved_config(step) if saved_cfg is None else saved_cfg
    diff = config_diff(saved_cfg, config.to_dict(), "model.")
    check_param_shapes(current_shapes(self.param_shapes(step)), shapes_by_name(abstract_params),
                       self._where(step), diff)

  def restore(self, step: int, trainer):
    """(TrainState, data_state, saved config) at `step`, sharded as `trainer.state_shardings`."""
    self.check_model(step, trainer.config, trainer.abstract_params)
    abstract = jax.eval_shape(functools.partial(trainer._init, trainer.config.seed))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, trainer.state_shardings)
    legacy = self._legacy_train_leaves(step, target.step.sharding)
    out = self._restore(step, params=target.params, data=None, config=None,
                        train={"step": target.step, "opt_state": target.opt_state, **legacy})
    tr = out["train"]
    state = target.replace(step=tr["step"], params=out["params"], opt_state=tr["opt_state"])
    return state, dict(out["data"] or {}), dict(out["config"])

  def _legacy_train_leaves(self, step: int, sharding) -> dict:
    """Restore targets for the `LEGACY_TRAIN_LEAVES` that `step`'s train item holds (Orbax
    restores only a tree that matches the one on disk); restored, then dropped."""
    try:
      md = self._mngr.item_metadata(step)["train"]
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e
    tree = getattr(md, "tree", md) or {}
    return {k: jax.ShapeDtypeStruct(tuple(tree[k].shape), tree[k].dtype, sharding=sharding)
            for k in LEGACY_TRAIN_LEAVES if k in tree}

  def restore_params(self, step: int, config: ml_collections.ConfigDict, abstract_params,
                     shardings):
    """Only the parameters at `step` of the model of `config`, sharded as `shardings`."""
    self.check_model(step, config, abstract_params)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
    return self._restore(step, params=target)["params"]

  def _restore(self, step: int, **items) -> dict:
    """The items of `step`: a target tree restores an array item, None a JSON one. Parameters
    renamed since the checkpoint was written are read under their former names and handed back
    under today's (runs/legacy.py), in the optimizer state too."""
    arrays = any(t is not None for t in items.values())
    former = former_names(self.param_shapes(step)) if arrays else {}
    args = {k: ocp.args.JsonRestore() if t is None else ocp.args.StandardRestore(
        rename_keys(t, former)) for k, t in items.items()}
    sums = integrity.restore_args(self.step_path(step)) if arrays else {}
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**args, **sums))
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e
    if sums:  # arrays whose bytes differ from the checksums saved with them: ChecksumMismatch
      restored = {k: out[k] for k, t in items.items() if t is not None}
      integrity.check(out[integrity.CHECKSUMS], restored, self._where(step), self._way_out(step))
    return {k: out[k] if t is None else rename_keys(out[k], undo(former))
            for k, t in items.items()}

  def reload(self) -> None:
    """Re-reads the steps on disk (after step directories were moved)."""
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def check_load_from(config: ml_collections.ConfigDict) -> None:
  """Start-up check of `checkpoint.load_from` (before the workdir is touched): ConfigError
  unless it holds a checkpoints directory with a complete step."""
  ckc = config.checkpoint
  if ckc.load_part != "params":
    return
  directory = load_from_dir(ckc.load_from)
  if not os.path.isdir(directory):
    raise ConfigError(f"checkpoint.load_from={ckc.load_from!r}: no checkpoints directory "
                      f"{directory}")
  if not complete_steps(directory):
    raise ConfigError(f"checkpoint.load_from={ckc.load_from!r}: no complete checkpoint in "
                      f"{directory}")


def load_from_dir(src: str) -> str:
  """The checkpoints directory of `checkpoint.load_from` (a workdir or its checkpoints/)."""
  if os.path.basename(os.path.normpath(src)) == CKPT_DIR:
    return src
  return os.path.join(src, CKPT_DIR)
