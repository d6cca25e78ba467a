"""Checkpoints: bit-exact resume after SIGKILL and SIGTERM (real subprocesses), skipped incomplete
saves, params-only warm start at a longer context, clear errors for shape changes and corruption.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.runs.resume import start_run
from ttt_jax.train.loop import train_and_evaluate
from ttt_jax.train.metrics import read_metrics
from ttt_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 40, 4
OVERRIDES = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
             "model.intermediate_size": 64, "data.batch_size": 2, "train.steps": STEPS,
             "train.warmup_steps": 4, "checkpoint.every_steps": EVERY, "checkpoint.keep": 10,
             "train.log_every": 1, "train.eval_every": 100, "train.eval_batches": 1}
# The killed runs evaluate after every step only to slow them down (eval never touches the
# train state), so that the kill lands mid-run.
SLOW = {"train.eval_every": 1, "train.eval_batches": 8}


def tiny_config(**extra):
  c = build_config("model=swa,ctx=64")
  for k, v in {**OVERRIDES, **extra}.items():
    section, key = k.rsplit(".", 1)
    c[section][key] = v if not isinstance(c[section][key], str) else str(v)
  return c


def launch(workdir, **extra) -> subprocess.Popen:
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
       "--config", os.path.join(ROOT, "configs", "pretrain.py") + ":model=swa,ctx=64",
       "--workdir", str(workdir), *flags],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def wait_for(pred, proc, timeout=300.0):  # generous: the machine may be busy
  end = time.time() + timeout
  while not pred():
    assert proc.poll() is None, "training finished before it could be interrupted"
    assert time.time() < end, "timed out"
    time.sleep(0.002)


def steps_on_disk(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def complete_steps(workdir) -> list[int]:
  """Steps on disk that carry Orbax's completion markers (what a resume can restore)."""
  d = os.path.join(workdir, "checkpoints")
  return [s for s in steps_on_disk(workdir) if ckpt.is_complete_step(os.path.join(d, str(s)))]


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}


def raw_steps(workdir) -> list[int]:
  """Train steps in metrics.jsonl in file order, duplicates kept."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Run A uninterrupted; run B SIGKILLed at 3 random points in a row (each at least one
  checkpoint later than the last), resumed and SIGTERMed, resumed again to the end."""
  a_dir, b_dir = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
  a = launch(a_dir)
  rng = np.random.default_rng(int(time.time()))
  kills = []
  for _ in range(3):
    last = max(complete_steps(b_dir), default=0)
    target = min(last + EVERY + int(rng.integers(0, EVERY)), STEPS - 3 * EVERY)
    b = launch(b_dir, **SLOW)
    # killed once this process has committed a checkpoint past the last one (so every kill
    # leaves something to resume from: metrics.jsonl still holds the killed run's later steps
    # until the new one truncates it) and has logged the random target step
    wait_for(lambda t=target, s=last: max(complete_steps(b_dir), default=0) > s
             and max(losses(b_dir), default=0) >= t, b)
    time.sleep(float(rng.uniform(0, 0.05)))  # within a step or two of the target: a longer
    b.send_signal(signal.SIGKILL)             # sleep let a fast machine run close to the end
    b.communicate()
    kills.append(max(losses(b_dir)))
  killed_at = kills[-1]
  # the SIGTERM below must land before the end: after a checkpoint past killed_at
  assert killed_at < STEPS - EVERY, kills
  b2 = launch(b_dir, **SLOW)
  wait_for(lambda: any(s > killed_at for s in steps_on_disk(b_dir)), b2)
  b2.send_signal(signal.SIGTERM)
  out2, _ = b2.communicate(timeout=120)
  assert b2.returncode == 0, out2
  b3 = launch(b_dir)
  out3, _ = b3.communicate(timeout=240)
  out_a, _ = a.communicate(timeout=240)
  assert a.returncode == 0 and b3.returncode == 0, out_a + out3
  return {"a": a_dir, "b": b_dir, "out2": out2, "out3": out3, "kills": kills}


def test_resume_after_sigkill_and_sigterm_is_bit_exact(runs):
  out2, out3 = runs["out2"], runs["out3"]
  assert "resumed from step" in out2
  saved = int(re.search(r"preempted \(SIGTERM\): saved checkpoint at step (\d+)", out2)[1])
  assert saved < STEPS
  assert f"resumed from step {saved} (" in out3
  la, lb = losses(runs["a"]), losses(runs["b"])
  assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
  for s in la:
    assert la[s] == lb[s], (s, la[s], lb[s])  # bit for bit
  assert steps_on_disk(runs["b"])[-1] == STEPS
  # after 3 kills, a SIGTERM and the resumes, every step is in metrics.jsonl exactly once
  assert raw_steps(runs["b"]) == list(range(1, STEPS + 1)), runs["kills"]


@pytest.fixture(scope="module")
def trainer():
  return Trainer.create(tiny_config())


def test_checkpoint_with_the_former_rng_leaf_still_resumes(trainer, tmp_path):
  """Checkpoints written while the train state still carried its (never read) `rng` key resume
  with the same step, parameters and optimizer state."""
  state = trainer.init_state()
  state = state.replace(step=state.step + EVERY)
  old = ckpt.RunCheckpoints(str(tmp_path / ckpt.CKPT_DIR), async_save=False)
  old._mngr.save(EVERY, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                   "rng": jax.random.key_data(jax.random.key(0))}),
      data=ocp.args.JsonSave({}), config=ocp.args.JsonSave(trainer.config.to_dict())))
  old.close()
  run = start_run(trainer.config, str(tmp_path), trainer, echo=lambda s: None)
  run.checkpoints.close()
  assert run.step == EVERY and int(run.state.step) == EVERY
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                      (state.params, state.opt_state), (run.state.params, run.state.opt_state))
  assert all(jax.tree.leaves(same))


def copy_run(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def test_incomplete_checkpoint_is_skipped(runs, trainer, tmp_path):
  wd = copy_run(runs["a"], tmp_path / "w")
  # What a crash mid-save leaves: a tmp directory for a later step with only part of the files.
  partial = os.path.join(wd, "checkpoints", f"{STEPS + EVERY}.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(wd, "checkpoints", str(STEPS), "params"),
                  os.path.join(partial, "params.orbax-checkpoint-tmp-1234"))
  logs = []
  run = start_run(tiny_config(), wd, trainer, echo=logs.append)
  run.checkpoints.close()
  assert run.step == STEPS and int(run.state.step) == STEPS
  assert any("removing incomplete checkpoint" in s and partial in s for s in logs), logs
  assert f"resumed from step {STEPS} ({os.path.join(wd, 'checkpoints', str(STEPS))})" in logs
  assert not os.path.exists(partial)  # cleaned up once reported


def test_step_without_completion_markers_is_skipped(runs, trainer, tmp_path, caplog):
  wd = copy_run(runs["a"], tmp_path / "w")
  last = os.path.join(wd, "checkpoints", str(STEPS))
  for marker in (ckpt.COMMIT_FILE, ckpt.STEP_METADATA):  # e.g. an interrupted copy of the run
    os.remove(os.path.join(last, marker))
  # Opened read-only (evaluation): one notice, the previous complete step is the latest.
  logs = []
  with caplog.at_level("WARNING"):
    ro = ckpt.RunCheckpoints(os.path.join(wd, "checkpoints"), read_only=True, echo=logs.append)
  assert ro.steps()[-1] == STEPS - EVERY and ro.unmarked_steps() == [STEPS]
  ro.close()
  assert len(logs) == 1, logs
  assert f"skipping checkpoint step {STEPS} ({last})" in logs[0]
  assert f"using step {STEPS - EVERY}" in logs[0]
  assert "Given directory is read only" not in caplog.text  # Orbax's notice is silenced
  # Resumed: the same notice, the step is moved aside and the run continues from the previous.
  logs = []
  run = start_run(tiny_config(), wd, trainer, echo=logs.append)
  run.checkpoints.close()
  assert run.step == STEPS - EVERY and int(run.state.step) == STEPS - EVERY
  skipped = [s for s in logs if s.startswith("skipping checkpoint step")]
  assert len(skipped) == 1 and f"resuming from step {STEPS - EVERY}" in skipped[0], logs
  assert any(s.startswith(f"resumed from step {STEPS - EVERY} (") for s in logs), logs
  assert steps_on_disk(wd)[-1] == STEPS - EVERY
  assert os.path.isdir(os.path.join(wd, ckpt.DISCARDED_DIR, str(STEPS)))


def test_truncated_file_names_step_and_fallback(runs, trainer, tmp_path):
  wd = copy_run(runs["a"], tmp_path / "w")
  step_dir = os.path.join(wd, "checkpoints", str(STEPS))
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with pytest.raises(ckpt.CheckpointError) as e:
    start_run(tiny_config(), wd, trainer, echo=lambda s: None)
  msg = str(e.value)
  assert f"checkpoint step {STEPS} ({step_dir})" in msg
  assert "--config.checkpoint.step=N" in msg and str(STEPS - EVERY) in msg
  # The suggested fallback works and moves the unusable later step aside.
  logs = []
  run = start_run(tiny_config(**{"checkpoint.step": STEPS - EVERY}), wd, trainer,
                  echo=logs.append)
  run.checkpoints.close()
  assert run.step == STEPS - EVERY and run.data_state
  assert steps_on_disk(wd)[-1] == STEPS - EVERY
  assert os.path.isdir(os.path.join(wd, ckpt.DISCARDED_DIR, str(STEPS)))


def test_resume_with_changed_model_shape_names_parameter(runs, tmp_path):
  wd = copy_run(runs["a"], tmp_path / "w")
  bigger = tiny_config(**{"model.intermediate_size": 96})
  with pytest.raises(ckpt.CheckpointError, match=r"parameter 'blocks/0/mlp/w1' has shape "
                     r"\(32, 64\).*\(32, 96\).*model.intermediate_size: 64 -> 96"):
    start_run(bigger, wd, Trainer.create(bigger), echo=lambda s: None)


def test_resume_false_refuses_then_overwrite_starts_over(runs, trainer, tmp_path):
  wd = copy_run(runs["a"], tmp_path / "w")
  with pytest.raises(ConfigError, match="checkpoint.overwrite=True"):
    start_run(tiny_config(**{"checkpoint.resume": False}), wd, trainer, echo=print)
  run = start_run(tiny_config(**{"checkpoint.resume": False, "checkpoint.overwrite": True}),
                  wd, trainer, echo=print)
  run.checkpoints.close()
  assert run.step == 0 and steps_on_disk(wd) == []
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


def test_load_params_into_longer_context_run(runs, tmp_path):
  src = str(runs["a"])
  long = tiny_config(**{"data.seq_len": 128, "train.steps": 2, "checkpoint.load_part": "params",
                        "checkpoint.load_from": src, "train.eval_batches": 1})
  logs = []
  out = train_and_evaluate(long, str(tmp_path / "long"), echo=logs.append)
  assert out["start_step"] == 0 and int(out["state"].step) == 2
  assert any(s.startswith(f"loaded params from step {STEPS}") for s in logs), logs
  assert np.isfinite(out["history"][-1]["loss"])
  # Step 0 of the new run starts from exactly the source run's final parameters.
  t = Trainer.create(long)
  src_ck = ckpt.RunCheckpoints(os.path.join(src, "checkpoints"), read_only=True)
  params = src_ck.restore_params(STEPS, t.config, t.abstract_params, t.state_shardings.params)
  src_ck.close()
  logs.clear()
  fresh = start_run(tiny_config(**{"data.seq_len": 128, "checkpoint.load_part": "params",
                                   "checkpoint.load_from": src}),
                    str(tmp_path / "long2"), t, echo=logs.append)
  fresh.checkpoints.close()
  assert fresh.step == 0 and int(fresh.state.step) == 0
  same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), fresh.state.params, params)
  assert all(jax.tree.leaves(same))
  # A new optimizer: Adam moments and counts all zero.
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(fresh.state.opt_state))


def test_load_params_with_mismatched_shape_names_parameter(runs, tmp_path):
  wide = tiny_config(**{"model.intermediate_size": 96, "checkpoint.load_part": "params",
                        "checkpoint.load_from": str(runs["a"])})
  with pytest.raises(ckpt.CheckpointError, match=r"parameter 'blocks/0/mlp/w1' has shape"):
    start_run(wide, str(tmp_path / "w"), Trainer.create(wide), echo=lambda s: None)


def test_warm_started_run_relaunched_resumes_its_own_latest_step(runs, tmp_path):
  """checkpoint.load_step picks the source run's step; the new run's own resume ignores it, so
  the same command relaunched continues from the new run's latest step and discards nothing."""
  extra = {"train.steps": 3, "checkpoint.every_steps": 1, "checkpoint.keep": 2,
           "checkpoint.load_part": "params", "checkpoint.load_from": str(runs["a"]),
           "checkpoint.load_step": EVERY, "train.eval_batches": 1}
  wd = str(tmp_path / "b")
  logs = []
  train_and_evaluate(tiny_config(**{**extra, "train.steps": 2}), wd, echo=logs.append)
  assert any(s.startswith(f"loaded params from step {EVERY} ") for s in logs), logs
  logs.clear()
  out = train_and_evaluate(tiny_config(**extra), wd, echo=logs.append)
  assert any(s.startswith("resumed from step 2 ") for s in logs), logs
  assert out["start_step"] == 2 and int(out["state"].step) == 3
  assert not os.path.exists(os.path.join(wd, "checkpoints_discarded"))
  assert steps_on_disk(wd) == [2, 3]


def test_load_step_not_in_the_source_run_names_the_key(runs, tmp_path):
  c = tiny_config(**{"checkpoint.load_part": "params", "checkpoint.load_from": str(runs["a"]),
                     "checkpoint.load_step": 3})
  with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.load_step=3 not found"):
    start_run(c, str(tmp_path / "c"), Trainer.create(c), echo=lambda s: None)


def test_checkpoint_step_for_the_source_run_is_refused_with_the_new_key(runs, tmp_path):
  """checkpoint.step used to pick load_from's step; on a fresh warm start it names load_step."""
  c = tiny_config(**{"checkpoint.load_part": "params", "checkpoint.load_from": str(runs["a"]),
                     "checkpoint.step": EVERY})
  with pytest.raises(ConfigError, match=f"checkpoint.load_step={EVERY}") as e:
    start_run(c, str(tmp_path / "d"), Trainer.create(c), echo=lambda s: None)
  assert "\n" not in str(e.value)


def test_a_step_rotated_away_while_read_is_busy_not_corrupted(runs, tmp_path):
  """A reader (evaluate.py) whose step is deleted by the training run's `keep` rotation is told
  to retry, never that the checkpoint is corrupted or to start over."""
  wd = tmp_path / "copy"
  shutil.copytree(runs["a"], wd)
  ck = ckpt.RunCheckpoints(str(wd / "checkpoints"), read_only=True)
  try:
    step = ck.latest_step()
    shutil.rmtree(ck.step_path(step))
    with pytest.raises(ckpt.CheckpointError) as e:
      ck.saved_config(step)
  finally:
    ck.close()
  msg = str(e.value)
  assert "removed while it was being read" in msg and "retry" in msg, msg
  assert "corrupted" not in msg and "overwrite" not in msg


def test_resuming_as_another_model_kind_is_refused_unless_asked(tmp_path):
  """An SWA run resumed with model=transformer (same parameter shapes) used to load and train on
  as a transformer after a note; it is refused naming both, unless allow_model_change."""
  swa = tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 2})
  train_and_evaluate(swa, str(tmp_path), echo=lambda s: None)
  full = tiny_config(**{"train.steps": 4})
  full.model.kind, full.model.mixer = "transformer", "full"
  trainer = Trainer.create(full)
  with pytest.raises(ConfigError, match=r"holds a run of another model \(checkpoint step 2; "
                     r"model.kind: 'swa' -> 'transformer'; model.mixer: 'swa' -> 'full'\)"):
    start_run(full, str(tmp_path), trainer, echo=lambda s: None)
  full.checkpoint.allow_model_change = True
  run = start_run(full, str(tmp_path), trainer, echo=lambda s: None)
  run.checkpoints.close()
  assert run.step == 2


def test_a_layout_mismatch_names_the_flag_that_loads_the_run():
  # a run saved with its blocks as a list, loaded with a config that stacks them
  saved = {"blocks/0/mlp/w1": (8, 16), "blocks/1/mlp/w1": (8, 16)}
  expected = {"blocks/mlp/w1": (2, 8, 16)}
  diff = ckpt.config_diff({"model": {"scan_layers": False}}, {"model": {"scan_layers": True}},
                          "model.")
  with pytest.raises(ckpt.CheckpointError,
                     match=r"scan_layers: False -> True.*--config\.model\.scan_layers=False"):
    ckpt.check_param_shapes(saved, expected, "step 5", diff)
  with pytest.raises(ckpt.CheckpointError) as other:  # other differences get no such advice
    ckpt.check_param_shapes(saved, expected, "step 5", ["model.d_model: 64 -> 128"])
  assert "scan_layers" not in str(other.value)
