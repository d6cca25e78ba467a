"""Checksums of checkpoint arrays: bytes damaged inside a saved array are found on restore and
named in one line (read-only loading), or the run resumes from the step before (training); an
intact checkpoint and one written before checksums existed load as before."""

from __future__ import annotations

import glob
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ttt_jax
from ttt_jax.cli import user_errors
from ttt_jax.config import build_config
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.runs import integrity
from ttt_jax.runs.load import load_run
from ttt_jax.runs.resume import start_run

LAST, EVERY = 4, 2


def tiny_config(**extra):
  c = build_config("model=swa,ctx=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.model.intermediate_size, c.model.window = 64, 16
  c.data.batch_size, c.train.steps, c.train.warmup_steps = 2, LAST, 1
  c.train.eval_every, c.train.eval_batches, c.checkpoint.every_steps = 100, 1, EVERY
  for k, v in extra.items():
    section, key = k.rsplit(".", 1)
    c[section][key] = v
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
  """A tiny run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("integrity") / "run")
  ttt_jax.train_and_evaluate(tiny_config(), workdir, echo=lambda s: None)
  return workdir


def step_dir(workdir, step) -> str:
  return os.path.join(workdir, ckpt.CKPT_DIR, str(step))


def _read_raw(params_dir: str) -> list[np.ndarray] | None:
  """The arrays Orbax reads from a params item, checksums aside; None when it cannot read them."""
  try:
    with ocp.StandardCheckpointer() as reader:
      return [np.asarray(x) for x in jax.tree.leaves(reader.restore(params_dir))]
  except Exception:  # noqa: BLE001  (a damaged file that does not even read)
    return None


def damage_params(workdir, step=LAST) -> None:
  """Overwrites bytes in the largest data file Orbax wrote for the params of `step` (its OCDBT
  chunks) so that the file still reads and gives wrong values: damage the checksums alone can
  catch. Where the bytes fall decides whether the file still reads (compressed chunks may fail to
  decode), so positions drawn from fixed seeds are tried until one reads with other values."""
  params_dir = os.path.join(step_dir(workdir, step), "params")
  files = glob.glob(os.path.join(params_dir, "**", "d", "*"), recursive=True)
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "rb") as f:
    original = f.read()
  intact = _read_raw(params_dir)
  for seed in range(64):
    data = bytearray(original)
    rng = np.random.default_rng(seed)
    for i in rng.integers(len(data) // 4, 3 * len(data) // 4, size=1 + seed % 4):
      data[i] = (data[i] + int(rng.integers(1, 256))) % 256
    with open(biggest, "wb") as f:
      f.write(bytes(data))
    read = _read_raw(params_dir)
    if read is not None and any(not np.array_equal(a, b) for a, b in zip(read, intact,
                                                                        strict=True)):
      return
  raise AssertionError(f"no damage of {biggest} that still reads was found")


@pytest.fixture
def damaged(run, tmp_path) -> str:
  workdir = str(tmp_path / "damaged")
  shutil.copytree(run, workdir)
  damage_params(workdir)
  return workdir


def test_an_intact_checkpoint_loads_with_its_checksums(run, monkeypatch):
  assert os.path.isdir(os.path.join(step_dir(run, LAST), integrity.CHECKSUMS))
  compared = []
  real = integrity.damaged_arrays
  monkeypatch.setattr(integrity, "damaged_arrays",
                      lambda saved, restored: compared.append(saved) or real(saved, restored))
  loaded = load_run(run)
  assert loaded.step == LAST
  # the loaded arrays were compared with the saved checksums, every parameter named there
  n_params = len(jax.tree.leaves(loaded.params))
  assert len(compared) == 1 and len(compared[0]["params"]) == n_params, compared


def test_load_run_names_the_damaged_step_in_one_line(damaged):
  with pytest.raises(ckpt.CheckpointError) as e:
    load_run(damaged)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"checkpoint step {LAST} ({step_dir(damaged, LAST)}) is damaged: array "
                        "params/"), msg
  assert "differs from the checksum saved with it" in msg
  assert f"available: {LAST - EVERY}" in msg and "--step N" in msg, msg
  assert load_run(damaged, step=LAST - EVERY).step == LAST - EVERY  # the earlier step is intact


def test_the_scripts_error_handler_prints_it_as_one_line(damaged, capsys):
  """`user_errors`, the handler around evaluate.py, generate.py, convert.py --export ..., reports
  it as their one error line."""
  with pytest.raises(SystemExit) as e, user_errors():
    load_run(damaged)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1 and "is damaged" in err, err


def test_resume_moves_a_damaged_latest_step_aside_and_continues_from_the_one_before(damaged):
  config = tiny_config(**{"train.steps": LAST + EVERY})
  trainer = ttt_jax.Trainer.create(config)
  asked = tiny_config(**{"train.steps": LAST + EVERY, "checkpoint.step": LAST})
  with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint step {LAST} .* is damaged"):
    start_run(asked, damaged, trainer, echo=lambda s: None)  # the step asked for: no fallback
  logs = []
  started = start_run(config, damaged, trainer, echo=logs.append)
  started.checkpoints.close()
  assert started.step == LAST - EVERY and int(started.state.step) == LAST - EVERY
  dest = os.path.join(damaged, ckpt.DISCARDED_DIR)
  warned = [s for s in logs if "is damaged" in s]
  assert len(warned) == 1 and warned[0].startswith(
      f"warning: checkpoint step {LAST} ({step_dir(damaged, LAST)}) is damaged: array params/")
  assert warned[0].endswith(f"; moved it to {dest}, resuming from step {LAST - EVERY}"), warned
  assert any(s.startswith(f"resumed from step {LAST - EVERY} (") for s in logs), logs
  assert os.path.isdir(os.path.join(dest, str(LAST)))
  assert not os.path.exists(step_dir(damaged, LAST))  # so the run can save step 4 again


def test_a_checkpoint_without_checksums_loads_unverified_without_notice(run, tmp_path, capsys):
  """Steps written before checksums existed have no checksums item: they load as before."""
  old = str(tmp_path / "old")
  config = tiny_config()
  trainer = ttt_jax.Trainer.create(config)
  state = trainer.init_state()
  ck = ckpt.RunCheckpoints(os.path.join(old, ckpt.CKPT_DIR), async_save=False)
  ck._mngr.save(EVERY, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
      data=ocp.args.JsonSave({}), config=ocp.args.JsonSave(config.to_dict())))
  ck.close()
  assert not os.path.exists(os.path.join(step_dir(old, EVERY), integrity.CHECKSUMS))
  damage_params(old, EVERY)  # not found: nothing to compare with
  capsys.readouterr()
  assert load_run(old).step == EVERY
  logs = []
  started = start_run(config, old, trainer, echo=logs.append)
  started.checkpoints.close()
  assert started.step == EVERY and not any("damaged" in s for s in logs), logs
  assert "checksum" not in capsys.readouterr().err


def test_checksums_cover_every_array_and_name_only_changed_ones():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.zeros(3, np.int32)]}
  saved = integrity.checksums({"params": tree})
  assert set(saved["params"]) == {"a", "b/0"}
  assert integrity.damaged_arrays(saved, {"params": tree}) == []
  changed = {"a": tree["a"].copy(), "b": [np.zeros(3, np.int32)]}
  changed["a"][1, 2] = np.nextafter(changed["a"][1, 2], np.float32(9))  # one bit
  assert integrity.damaged_arrays(saved, {"params": changed}) == ["params/a"]
  cast = {"a": tree["a"].astype(np.float16), "b": tree["b"]}  # a restore that casts: not compared
  assert integrity.damaged_arrays(saved, {"params": cast}) == []
