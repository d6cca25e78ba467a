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


# the Makefile's variables that a user may set (`make test-newest NEWEST=...` runs these tests)
MAKE_VARIABLES = {"PY", "NEWEST", "NEWEST_PY", "NEWEST_VENV", "NEWEST_CUDA_MAJOR", "CUDA_MAJOR",
                  "CUDA_NEWEST_VENV", "GPU_WHEELS", "WHEEL_PY", "WHEEL_DIR", "GPU_CHECK_ARGS",
                  "GPU_CENSUS_ARGS"}


def make(*args) -> subprocess.CompletedProcess:
  """`make -C <repository> ARGS`, free of the make (if any) running the tests."""
  env = {k: v for k, v in os.environ.items()  # nor its variables (make exports those set on its
         if not k.startswith("MAKE") and k not in MAKE_VARIABLES}  # command line to recipes)
  return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True,
                        env=env, check=False)


def make_wheels(tmp_path, *args):
  """Runs the target with PY = a script that logs its arguments and writes no wheel."""
  log = tmp_path / "calls.txt"
  fake = tmp_path / "python"
  fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = make("-s", "gpu-wheels", f"PY={fake}", f"WHEEL_DIR={tmp_path / 'whl'}", *args)
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


# what a CUDA image with JAX holds of the package's dependencies (its package list)
IMAGE_HAS = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy", "tqdm",
             "matplotlib", "tokenizers", "sentencepiece", "safetensors", "psutil"}


def runtime_dependencies() -> set[str]:
  text = (ROOT / "pyproject.toml").read_text()
  block = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
  return {re.match(r"[\w.-]+", d).group(0) for d in re.findall(r'"([^"]+)"', block)}


def test_the_default_list_is_every_dependency_such_an_image_lacks_at_its_pin(tmp_path):
  out, calls = make_wheels(tmp_path)
  assert out.returncode == 0, out.stderr
  fetched = {c.split()[-1].split("==")[0] for c in calls}
  lacking = runtime_dependencies() - IMAGE_HAS
  assert lacking and lacking <= fetched, lacking - fetched
  assert fetched - lacking == {"portpicker"}  # grain's own need, not in such an image
  assert fetched <= set(pins())


def test_cuda_major_picks_the_plugin_and_its_venv():
  default, thirteen = make("-n", "gpu-census").stdout, make("-n", "gpu-census",
                                                            "CUDA_MAJOR=13").stdout
  assert ".venv-cuda/bin/pip" in default and '"jax-cuda12-plugin[with-cuda]' in default
  assert ".venv-cuda13/bin/pip" in thirteen and '"jax-cuda13-plugin[with-cuda]' in thirteen
  bad = make("-s", "gpu-census", "CUDA_MAJOR=11")
  assert bad.returncode != 0 and "CUDA_MAJOR=11: 12 or 13" in bad.stdout


def test_the_newest_census_installs_the_newest_jax_with_its_plugin(tmp_path):
  """`make gpu-census-newest`: test-newest's JAX and Flax, the CUDA plugin at that JAX (CUDA 13's
  by default: the CUDA 12 plugin has no 0.12.1), in a venv of its own per CUDA major; a Python
  older than 3.12 is refused by name, and so is a CUDA major other than 12 or 13."""
  default = make("-n", "gpu-census-newest").stdout
  twelve = make("-n", "gpu-census-newest", "NEWEST_CUDA_MAJOR=12",
                "NEWEST=jax==0.12.0.1 jaxlib==0.12.0.1 flax==0.12.12").stdout
  assert ".venv-cuda13-newest/bin/pip install" in default
  assert "jax==0.12.1 jaxlib==0.12.1 flax==0.12.12" in default
  assert '"jax-cuda13-plugin[with-cuda]==0.12.1"' in default
  assert ".venv-cuda-newest/bin/pip" in twelve and '"jax-cuda12-plugin[with-cuda]==0.12.0.1"' in (
      twelve)
  missing = make("-s", "gpu-census-newest", "NEWEST_PY=/no/such/python3.12",
                 f"CUDA_NEWEST_VENV={tmp_path / 'venv'}")  # never this machine's venv
  assert missing.returncode != 0 and "missing or older than 3.12" in missing.stdout
  bad = make("-s", "gpu-census-newest", "NEWEST_CUDA_MAJOR=11")
  assert bad.returncode != 0 and "NEWEST_CUDA_MAJOR=11: 12 or 13" in bad.stdout


def test_test_newest_takes_another_set_in_its_own_venv():
  """`make test-newest` installs jax 0.12.1 and flax 0.12.12 by default; NEWEST and NEWEST_VENV
  name another set (a CUDA image's) and where it goes; the install's stamp names its set, so
  another NEWEST in the same venv is installed, not the last set reused."""
  default = make("-n", "-B", "test-newest").stdout
  image = make("-n", "-B", "test-newest", "NEWEST=jax==0.11.2 jaxlib==0.11.2 flax==0.12.10",
               "NEWEST_VENV=.venv-0112").stdout
  assert "jax==0.12.1 jaxlib==0.12.1 flax==0.12.12 -e" in default
  assert ".venv-newest/bin/python -m pytest" in default
  assert "jax==0.11.2 jaxlib==0.11.2 flax==0.12.10 -e" in image
  assert ".venv-0112/bin/python -m pytest" in image and ".venv-newest" not in image
  assert "touch .venv-newest/.installed-jax==0.12.1-jaxlib==0.12.1-flax==0.12.12" in default
  assert "touch .venv-0112/.installed-jax==0.11.2-jaxlib==0.11.2-flax==0.12.10" in image


def test_an_unpinned_package_is_refused_naming_constraints_txt(tmp_path):
  out, calls = make_wheels(tmp_path, "GPU_WHEELS=no_such_package", "WHEEL_PY=3.13")
  assert out.returncode != 0
  assert "no_such_package has no exact pin in constraints.txt" in out.stdout
  assert calls == []
