"""A train step that does not fit its devices' memory: XLA's out-of-memory error said in one
line, with what each device holds and the settings that make a step hold less."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import ml_collections

from ttt_jax.models.e2e import chunk_group


class DeviceMemoryFull(RuntimeError):
  """The train step needs more device memory than there is; the message is one line."""


def is_out_of_memory(err: BaseException) -> bool:
  """XLA's failed device allocation ("RESOURCE_EXHAUSTED: Out of memory while trying to
  allocate ...", TPU: "... Ran out of memory in memory space hbm"), not other exhausted
  resources (message sizes, the distributed runtime's limits)."""
  text = str(err).lower()
  return isinstance(err, jax.errors.JaxRuntimeError) and (
      "out of memory" in text or ("resource_exhausted" in text and "memory" in text))


def xla_line(err: BaseException) -> str:
  """The first line of XLA's message (its allocation report follows)."""
  return next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:200]


def out_of_memory_message(err: BaseException, hint: str = "") -> str:
  """One line for an out-of-memory error outside a train step (evaluation, generation, ...):
  XLA's first line and `hint`, the settings that make the program hold less."""
  return (f"ran out of device memory ({xla_line(err)}); "
          f"{hint or 'smaller batches or chunks fit in less (see --help)'}")


def explain(err: BaseException, config: ml_collections.ConfigDict, rows_per_device: int,
            step: int) -> DeviceMemoryFull:
  """The one-line DeviceMemoryFull for XLA's out-of-memory error `err` at train step `step`;
  `rows_per_device`: the sequences of the whole batch (all microbatches) on one device."""
  d, tr, m = config.data, config.train, config.model
  ways = []
  if rows_per_device % (2 * tr.grad_accum) == 0:  # each device still gets whole sequences
    ways.append(f"train.grad_accum={2 * tr.grad_accum} (microbatches of half as many sequences)")
  if m.remat != "full":
    ways.append("model.remat=full")
  if (m.kind == "e2e" and m.e2e.train_mode == "meta" and m.e2e.remat_group == 0
      and chunk_group(-1, d.seq_len // m.e2e.mini_batch_size) > 1):
    ways.append("model.e2e.remat_group=-1 (the chunk loop in checkpointed groups)")
  ways.append("more devices in mesh.fsdp")
  return DeviceMemoryFull(
      f"train step {step} ran out of device memory ({xla_line(err)}); each device holds "
      f"{rows_per_device / tr.grad_accum:g} sequences of {d.seq_len} tokens at a time "
      f"(data.batch_size={d.batch_size} over {d.batch_size // rows_per_device} devices, "
      f"train.grad_accum={tr.grad_accum}); to fit, set {', or '.join(ways)}; docs/scaling.md "
      "gives each preset's memory per GPU")


@contextlib.contextmanager
def explained(config: ml_collections.ConfigDict, rows_per_device: int,
              step: int) -> Iterator[None]:
  """Turns XLA's out-of-memory error inside into `explain`'s DeviceMemoryFull for train step
  `step`; other errors pass as they are."""
  try:
    yield
  except jax.errors.JaxRuntimeError as err:
    if not is_out_of_memory(err):
      raise
    raise explain(err, config, rows_per_device, step) from err
