"""Read-only runs: evaluate.py / read.py / needle.py / adapt.py check before any work that their
output folders can be written (one line naming the folder and --out otherwise), and --out DIR
writes the results elsewhere; --compare with a missing workdir fails before the first run's
work (ttt_jax/cli_output.py)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import tempfile

import jax
import pytest

from ttt_jax import cli, cli_output

from ..repo_files import load_file


def load_script(name: str):
  return load_file(f"scripts/{name}.py")


def make_read_only(monkeypatch, root: str) -> None:
  """Every write under `root` fails with EACCES, as on a read-only mount (the tests run as root,
  where file modes do not stop writes)."""
  root = os.path.realpath(root)

  def inside(path) -> bool:
    path = os.path.realpath(os.fspath(path))
    return path == root or path.startswith(root + os.sep)

  def denied(path):
    return PermissionError(13, "Permission denied", os.fspath(path))

  real_makedirs, real_mkdir, real_open = os.makedirs, os.mkdir, builtins.open
  real_tempfile = tempfile.TemporaryFile

  def makedirs(path, *a, **k):
    if inside(path) and not os.path.isdir(path):
      raise denied(path)
    return real_makedirs(path, *a, **k)

  def mkdir(path, *a, **k):
    if inside(path):
      raise denied(path)
    return real_mkdir(path, *a, **k)

  def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and inside(file):
      raise denied(file)
    return real_open(file, mode, *a, **k)

  def temporary_file(*a, dir=None, **k):  # noqa: A002 (tempfile's own name)
    if dir is not None and inside(dir):
      raise denied(dir)
    return real_tempfile(*a, dir=dir, **k)

  monkeypatch.setattr(os, "makedirs", makedirs)
  monkeypatch.setattr(os, "mkdir", mkdir)
  monkeypatch.setattr(builtins, "open", open_)
  monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)


@pytest.fixture
def read_only_run(trained_run, tmp_path, monkeypatch) -> str:
  """A copy of the trained run whose folder cannot be written."""
  workdir = str(tmp_path / "ro")
  shutil.copytree(trained_run, workdir, ignore=shutil.ignore_patterns("eval", "adapters"))
  make_read_only(monkeypatch, workdir)
  return workdir


def test_unwritable_names_the_reason_and_creates_nothing(tmp_path):
  assert cli_output.unwritable(str(tmp_path / "a" / "b")) is None
  assert not (tmp_path / "a").exists()
  (tmp_path / "f").write_text("x")
  assert "is not a folder" in cli_output.unwritable(str(tmp_path / "f" / "eval"))
  assert cli_output.results_dirs(["r/x", "s/x", "y"], "O") == ["O/x", "O/x-2", "O/y"]
  assert cli_output.results_dirs(["r/x"], "O") == ["O"]
  assert cli_output.results_dirs(["r/x"], None, "adapters") == ["r/x/adapters"]


@pytest.mark.parametrize("script", ["evaluate", "read", "needle"])
def test_read_only_run_fails_before_work_in_one_line(script, read_only_run, capsys,
                                                     monkeypatch):
  module = load_script(script)
  monkeypatch.setattr(cli, "load_run", lambda *a: pytest.fail("a checkpoint was read"))
  extra = {"evaluate": ["--ctx", "32"], "read": ["--min_len", "32"], "needle": ["--ctx", "64"]}
  with pytest.raises(SystemExit) as e:
    module.main(["--workdir", read_only_run, "--no_progress", *extra[script]])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1, err
  assert f"cannot write the results to {read_only_run}/eval" in err and "--out DIR" in err


def test_evaluate_out_writes_elsewhere_and_compare_per_run(read_only_run, trained_run,
                                                           tmp_path, capsys):
  evaluate = load_script("evaluate")
  out = tmp_path / "results"
  evaluate.main(["--workdir", read_only_run, "--ctx", "32", "--max_docs", "2", "--no_progress",
                 "--out", str(out)])
  assert json.loads((out / "results.json").read_text())["step"] == 2
  assert (out / "ppl_vs_ctx.png").exists() and not os.path.exists(f"{read_only_run}/eval")
  evaluate.main(["--workdir", read_only_run, "--compare", trained_run, "--ctx", "32",
                 "--max_docs", "2", "--no_progress", "--out", str(out / "both")])
  names = sorted(p.name for p in (out / "both").iterdir())
  assert names == sorted(["ro", "swa", "compare.json", "compare_ppl_vs_ctx.png",
                          "compare_loss_vs_position.png"]), names
  capsys.readouterr()
  with pytest.raises(SystemExit):  # an --out that cannot be written either: named as --out
    evaluate.main(["--workdir", trained_run, "--ctx", "32", "--out", f"{read_only_run}/x"])
  assert f"--out {read_only_run}/x: cannot write" in capsys.readouterr().err


def test_evaluate_says_running_out_of_device_memory_in_one_line(trained_run, tmp_path, capsys,
                                                                 monkeypatch):
  """XLA's out-of-memory error inside an evaluation: one line naming evaluate.py's batch and
  chunk options (tests/train/test_device_memory.py: the line of every script)."""
  evaluate = load_script("evaluate")

  def oom(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                     "2.00GiB.\n  buffer list ...")

  monkeypatch.setattr(evaluate.strided, "evaluate_run", oom)
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--workdir", trained_run, "--ctx", "32", "--out", str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1, err
  assert err.endswith("error: ran out of device memory (RESOURCE_EXHAUSTED: Out of memory while "
                      "trying to allocate 2.00GiB.); fewer documents per streamed batch "
                      "(--batch_size) or shorter chunks (--chunk) fit in less"), err


def test_compare_with_a_missing_workdir_fails_before_the_first_run(trained_run, tmp_path,
                                                                   capsys, monkeypatch):
  evaluate = load_script("evaluate")
  monkeypatch.setattr(evaluate.strided, "evaluate_run", lambda *a, **k: pytest.fail("worked"))
  with pytest.raises(SystemExit):
    evaluate.main(["--workdir", trained_run, "--compare", str(tmp_path / "nope"), "--ctx", "32"])
  assert f"--compare {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_adapt_out(read_only_run, texts, tmp_path, capsys):
  adapt = load_script("adapt")
  with pytest.raises(SystemExit) as e:
    adapt.run_absl(adapt.main, ["adapt.py", "--workdir", read_only_run, "--data", str(texts)])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert f"cannot write the results to {read_only_run}/adapters/tlm" in err, err


def test_evaluate_keeps_the_lengths_done_when_a_longer_one_fails(trained_run, tmp_path, capsys,
                                                                 monkeypatch):
  """Running out of memory at the longest context: the lengths finished before it are in
  results.partial.json ("complete": false); a run that finishes writes results.json and
  removes that file."""
  evaluate = load_script("evaluate")
  real = evaluate.perplexity.stream_nll

  def oom_at_64(graphdef, params, tokens, *args, **kwargs):
    if tokens.shape[1] > 33:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                       "allocate 2.00GiB.")
    return real(graphdef, params, tokens, *args, **kwargs)

  monkeypatch.setattr(evaluate.perplexity, "stream_nll", oom_at_64)
  argv = ["--workdir", trained_run, "--ctx", "32,64", "--max_docs", "2", "--no_progress",
          "--out", str(tmp_path)]
  with pytest.raises(SystemExit):
    evaluate.main(argv)
  partial = json.loads((tmp_path / "results.partial.json").read_text())
  assert partial["complete"] is False and [c["ctx"] for c in partial["contexts"]] == [32]
  assert not (tmp_path / "results.json").exists()
  monkeypatch.setattr(evaluate.perplexity, "stream_nll", real)
  evaluate.main(argv)
  done = json.loads((tmp_path / "results.json").read_text())
  assert [c["ctx"] for c in done["contexts"]] == [32, 64] and "complete" not in done
  drop = lambda c: {k: v for k, v in c.items() if k != "seconds"}  # noqa: E731
  assert drop(done["contexts"][0]) == drop(partial["contexts"][0])
  assert not (tmp_path / "results.partial.json").exists()
  capsys.readouterr()
