"""`make gpu-wheels`: the wheels a CUDA image without a package index needs, at the pinned
versions; run here with a stand-in for pip, so no index is reached."""

import os
import pathlib
import re
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
  text = (ROOT / "constraints.txt").read_text()
  return dict(re.findall(r"^([\w.-]+)==(\S+)$", text, re.M))


def make_wheels(tmp_path, *args):
  """Runs the target with PY = a script that logs its arguments and writes no wheel."""
  log = tmp_path / "calls.txt"
  fake = tmp_path / "python"
  fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
  out = subprocess.run(["make", "-s", "-C", str(ROOT), "gpu-wheels", f"PY={fake}",
                        f"WHEEL_DIR={tmp_path / 'whl'}", *args],
                       capture_output=True, text=True, env=env, check=False)
  calls = log.read_text().splitlines() if log.exists() else []
  return out, calls


def test_every_listed_package_is_fetched_at_its_pin_for_python_312(tmp_path):
  assert not (tmp_path / "whl").exists()
  out, calls = make_wheels(tmp_path, "GPU_WHEELS=grain ml_collections portpicker")
  assert out.returncode == 0, out.stderr
  pinned = pins()
  assert len(calls) == 3
  for name, call in zip(("grain", "ml_collections", "portpicker"), calls, strict=True):
    assert call.startswith("-m pip download")
    assert f"{name}=={pinned[name]}" in call.split()
    assert "--python-version 3.12" in call and "--only-binary=:all:" in call
    assert "--no-deps" in call and f"-d {tmp_path / 'whl'}" in call


def test_the_default_list_is_pinned_and_covers_the_data_stack(tmp_path):
  out, calls = make_wheels(tmp_path)
  assert out.returncode == 0, out.stderr
  fetched = {c.split()[-1].split("==")[0] for c in calls}
  # what the package imports beyond a CUDA image's JAX stack, and grain's own need
  assert fetched == {"grain", "array_record", "ml_collections", "tensorboardX", "gguf",
                     "portpicker"}
  assert fetched <= set(pins())


def test_an_unpinned_package_is_refused_naming_constraints_txt(tmp_path):
  out, calls = make_wheels(tmp_path, "GPU_WHEELS=no_such_package", "WHEEL_PY=3.13")
  assert out.returncode != 0
  assert "no_such_package has no exact pin in constraints.txt" in out.stdout
  assert calls == []
