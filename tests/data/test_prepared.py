"""A prepared folder damaged after it was made fails at start-up in one line naming the file (no
traceback after N steps); a record damaged in the middle of a shard fails in one line when read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grain
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import prepare
from ttt_jax.runs.workdir import check_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A prepared folder: 24 documents of ~3K tokens, 4 train shards, 2 validation shards."""
  src = tmp_path_factory.mktemp("src")
  for i in range(24):
    (src / f"doc{i}.txt").write_text(" ".join(WORDS[(i * j) % 8] for j in range(500)))
  out = tmp_path_factory.mktemp("prep") / "data"
  prepare.prepare(str(src), str(out), val_fraction=0.4, num_shards=4, echo=lambda s: 0)
  return out


def config(source):
  c = build_config("model=swa,scale=tiny,ctx=64")
  c.data.source, c.data.batch_size = str(source), 2
  return c


def shard(root, split, s=0):
  return next(p for p in sorted(os.listdir(root)) if p.startswith(f"{split}-0000{s}-of-"))


def overwrite(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def damage(root, how):
  """Damages the copy of a prepared folder at `root`; returns the file name the error names."""
  if how == "validation shard deleted":
    name = shard(root, "validation")
    os.remove(root / name)
    return f"{name} is missing"
  if how == "train shard emptied":
    (root / shard(root, "train", 1)).write_bytes(b"")
    return f"{shard(root, 'train', 1)} cannot be read"
  if how == "train shard truncated":
    os.truncate(root / shard(root, "train", 2), 20000)
    return f"{shard(root, 'train', 2)} cannot be read"
  if how == "train shard overwritten":
    overwrite(root / shard(root, "train"), 100, bytes(range(256)) * 8)
    return f"{shard(root, 'train')} cannot be read"
  if how == "metadata.json cut short":
    (root / "metadata.json").write_text('{"format": 1, "splits": ')
    return "metadata.json cannot be read"
  if how == "metadata.json without dtype":
    meta = json.loads((root / "metadata.json").read_text())
    del meta["dtype"]
    (root / "metadata.json").write_text(json.dumps(meta))
    return "metadata.json has no field 'dtype'"
  if how == "lengths file deleted":
    os.remove(root / "train.lengths.npy")
    return "train.lengths.npy is missing"
  if how == "lengths file garbage":
    (root / "validation.lengths.npy").write_bytes(b"garbage")
    return "validation.lengths.npy cannot be read"
  if how == "names file deleted":
    os.remove(root / "validation.names.txt")
    return "validation.names.txt is missing"
  raise AssertionError(how)


CASES = ["validation shard deleted", "train shard emptied", "train shard truncated",
         "train shard overwritten", "metadata.json cut short", "metadata.json without dtype",
         "lengths file deleted", "lengths file garbage", "names file deleted"]


@pytest.mark.parametrize("how", CASES)
def test_a_damaged_folder_fails_the_start_up_check_in_one_line(folder, tmp_path, how):
  copy = tmp_path / "data"
  shutil.copytree(folder, copy)
  named = damage(copy, how)
  with pytest.raises(ConfigError) as e:
    check_run(config(copy))
  msg = str(e.value)
  assert msg.startswith(f"prepared data {str(copy)!r} is damaged: "), msg
  assert named in msg and msg.endswith("prepare it again with scripts/prepare_data.py --force")
  assert "\n" not in msg


def test_the_intact_folder_passes(folder):
  assert check_run(config(folder)).prepared is not None


def damage_a_middle_record(path) -> int:
  """Overwrites bytes of `path` (an ArrayRecord shard) so that one record other than its first
  and last no longer reads; returns that record's index in the shard."""
  original = path.read_bytes()
  n = len(grain.sources.ArrayRecordDataSource([str(path)]))
  for offset in range(0, len(original.rstrip(b"\0")), 97):
    overwrite(path, offset, b"\x55" * 16)
    bad = []
    try:
      src = grain.sources.ArrayRecordDataSource([str(path)])
      for i in range(n):
        try:
          src[i]
        except Exception:  # noqa: BLE001
          bad.append(i)
    except Exception:  # noqa: BLE001 (the footer or index: not what this test wants)
      bad = [0]
    if len(bad) == 1 and 0 < bad[0] < n - 1:
      return bad[0]
    overwrite(path, 0, original)
  raise AssertionError("no byte range of a middle record found")


def test_a_record_damaged_inside_a_shard_fails_in_one_line_when_read(folder, tmp_path):
  """The start-up check reads each shard's first and last record; one in the middle is found
  when training reads it."""
  copy = tmp_path / "data"
  shutil.copytree(folder, copy)
  i = damage_a_middle_record(copy / shard(copy, "train"))
  part = check_run(config(copy)).prepared.split("train")
  with pytest.raises(ConfigError, match=rf"is damaged: document {i} of the train split \(in "
                     rf"{shard(copy, 'train')}\) cannot be read \(Corrupted"):
    part[i]
  assert len(part[0]) and len(part[i + 1])


def test_train_py_on_a_damaged_folder_is_one_line_before_any_work(folder, tmp_path):
  copy = tmp_path / "data"
  shutil.copytree(folder, copy)
  os.remove(copy / shard(copy, "validation"))
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=swa,ctx=64",
       f"--config.data.source={copy}", "--config.data.batch_size=2",
       "--workdir", str(tmp_path / "w")],
      capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=300)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f"train.py: error: prepared data {str(copy)!r} is damaged: "
                             f"{shard(folder, 'validation')} is missing")
  assert not os.path.exists(tmp_path / "w")
