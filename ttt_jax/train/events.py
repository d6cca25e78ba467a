"""TensorBoard event files, written synchronously: every record is on disk once `scalars` returns.

tensorboardX's `SummaryWriter` queues events for a background thread and flushes its file
every two minutes, so a killed run lost its last events (often all of them: an empty event
file). Here each call appends one framed `Event` (TFRecord: length, masked CRC32C of it, data,
masked CRC32C of the data) with `append_whole`, so a SIGKILL loses nothing already logged and
a full disk never leaves half a record. The file opens with its version record and a
`SessionLog.START` at `purge_step`, with which TensorBoard drops the events at steps
>= purge_step that earlier files of the directory hold (a resumed run logs them again).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from ttt_jax.runs.diskspace import append_whole

PREFIX = "events.out.tfevents."


def frame(data: bytes) -> bytes:
  header = struct.pack("Q", len(data))
  return (header + struct.pack("I", masked_crc32c(header)) + data
          + struct.pack("I", masked_crc32c(data)))


def read_events(path: str) -> Iterator[Event]:
  """The events of one file, up to the first incomplete or damaged record."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("Q", data[i:i + 8])
    body = data[i + 12:i + 12 + n]
    if len(body) < n or data[i + 12 + n:i + 16 + n] != struct.pack("I", masked_crc32c(body)):
      return
    yield Event.FromString(body)
    i += 16 + n


class EventFile:
  """A new event file in `directory` (empty files that earlier writers left there, killed before
  their first flush, are removed: they hold nothing)."""

  def __init__(self, directory: str, purge_step: int):
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
      path = os.path.join(directory, name)
      if name.startswith(PREFIX) and os.path.isfile(path) and os.path.getsize(path) == 0:
        os.remove(path)
    self.path = os.path.join(
        directory, f"{PREFIX}{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    now = time.time()
    try:
      self._append([Event(wall_time=now, file_version="brain.Event:2"),
                    Event(wall_time=now, step=purge_step,
                          session_log=SessionLog(status=SessionLog.START))])
    except BaseException:
      self.close()
      if os.path.getsize(self.path) == 0:  # nothing of it was written
        os.remove(self.path)
      raise

  def _append(self, events: list[Event]) -> None:
    append_whole(self._fd, b"".join(frame(e.SerializeToString()) for e in events), self.path)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event at `step` holding every `tag: value`."""
    if values:
      self._append([Event(wall_time=time.time(), step=step, summary=Summary(value=[
          Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]))])

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
