"""A train step that does not fit its devices' memory: XLA's out-of-memory error said in one
line, with what each device holds and the settings that make a step hold less."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import ml_collections

# how XLA words a failed device allocation (GPU, TPU and CPU clients alike)
MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


class DeviceMemoryFull(RuntimeError):
  """The train step needs more device memory than there is; the message is one line."""


def is_out_of_memory(err: BaseException) -> bool:
  return isinstance(err, jax.errors.JaxRuntimeError) and any(m in str(err) for m in MARKERS)


def explain(err: BaseException, config: ml_collections.ConfigDict, batch_devices: int,
            step: int) -> DeviceMemoryFull:
  """The one-line DeviceMemoryFull for XLA's out-of-memory error `err` at train step `step`."""
  d, tr, m = config.data, config.train, config.model
  xla = next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:200]
  per_device = d.batch_size / (batch_devices * tr.grad_accum)
  ways = [f"train.grad_accum={2 * tr.grad_accum} (microbatches of half as many sequences)"]
  if m.remat != "full":
    ways.append("model.remat=full")
  if m.kind == "e2e" and m.e2e.train_mode == "meta" and m.e2e.remat_group == 0:
    ways.append("model.e2e.remat_group=-1 (the chunk loop in checkpointed groups)")
  ways.append("more devices in mesh.fsdp")
  return DeviceMemoryFull(
      f"train step {step} ran out of device memory ({xla}); each device holds {per_device:g} "
      f"sequences of {d.seq_len} tokens at a time (data.batch_size={d.batch_size} over "
      f"{batch_devices} devices, train.grad_accum={tr.grad_accum}); to fit, set "
      f"{', or '.join(ways)}; docs/scaling.md gives each preset's memory per GPU")


@contextlib.contextmanager
def explained(config: ml_collections.ConfigDict, batch_devices: int,
              step: int) -> Iterator[None]:
  """Turns XLA's out-of-memory error inside into `explain`'s DeviceMemoryFull for train step
  `step`; other errors pass as they are."""
  try:
    yield
  except jax.errors.JaxRuntimeError as err:
    if not is_out_of_memory(err):
      raise
    raise explain(err, config, batch_devices, step) from err
