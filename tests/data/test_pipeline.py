"""Embedded corpus, token stream and grain windows: order, BOS, determinism, split, restart."""

import re

import numpy as np
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import pipeline, sources
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def data_cfg():
  c = build_config("model=swa,scale=tiny,ctx=256").data
  return c


@pytest.fixture(scope="module")
def data(data_cfg):
  return Dataset.from_config(data_cfg)


@pytest.fixture(scope="module")
def train_stream(data):
  return data.stream("train")


def test_embedded_corpus_is_real_and_split_disjoint(data_cfg):
  files = sources.embedded_files()
  assert len(files) > 300
  assert not any(part.startswith("test") for f in files for part in f.split("/")[:-1])
  train = {n for n, _ in sources.embedded_documents("train", data_cfg.val_fraction)}
  val = {n for n, _ in sources.embedded_documents("validation", data_cfg.val_fraction)}
  assert train and val and not (train & val)
  assert train | val == set(files) - {f for f in files if not _has_text(f)}


def _has_text(rel):
  with open(f"{sources.stdlib_dir()}/{rel}", "rb") as f:
    return bool(f.read().decode("utf-8", errors="replace").strip())


def test_stream_is_documents_in_order_with_bos_eos(train_stream):
  tok = ByteTokenizer()
  s = train_stream
  assert (s.tokens[s.doc_starts] == tok.bos_id).all()
  assert (s.tokens[s.doc_starts[1:] - 1] == tok.eos_id).all()
  # the third document comes back byte for byte
  name = s.names[2]
  with open(f"{sources.stdlib_dir()}/{name}", "rb") as f:
    text = f.read().decode("utf-8", errors="replace")
  start, length = s.doc_starts[2], s.doc_lengths[2]
  np.testing.assert_array_equal(s.tokens[start + 1:start + length - 1], tok.encode(text))


def test_windows_cover_the_stream_in_order(train_stream, data_cfg):
  src = pipeline.WindowSource(train_stream.tokens, data_cfg.seq_len)
  L = data_cfg.seq_len
  assert len(src) == (len(train_stream.tokens) - 1) // L
  w0, w1 = src[0]["tokens"], src[1]["tokens"]
  assert w0.shape == (L + 1,)
  assert w0[-1] == w1[0]  # the target of window i's last position starts window i+1
  np.testing.assert_array_equal(np.concatenate([w0[:-1], w1[:-1]]), train_stream.tokens[:2 * L])


def test_unshuffled_batches_are_consecutive_windows(data, data_cfg, train_stream):
  ds = data.windows("train", data_cfg.seq_len, seed=0, shuffle=False, batch_size=3)
  L = data_cfg.seq_len
  b = ds[1]["tokens"]
  np.testing.assert_array_equal(b[0, :-1], train_stream.tokens[3 * L:4 * L])


def test_shuffle_is_deterministic_per_seed(data, data_cfg):
  a, b, c = (data.windows("train", data_cfg.seq_len, seed=seed, shuffle=True, batch_size=4)
             for seed in (3, 3, 4))
  np.testing.assert_array_equal(a[5]["tokens"], b[5]["tokens"])
  assert not np.array_equal(a[5]["tokens"], c[5]["tokens"])


def test_iterator_restarts_from_saved_state(data, data_cfg):
  ds = data.windows("train", data_cfg.seq_len, seed=0, shuffle=True, batch_size=2)
  it = pipeline.make_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(2)]
  it2 = pipeline.make_iterator(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["tokens"], e)


def test_processes_read_disjoint_windows(data, data_cfg):
  get = lambda **kw: data.windows("train", data_cfg.seq_len, seed=0, shuffle=False, **kw)
  a = get(batch_size=2, process_index=0, process_count=2)
  b = get(batch_size=2, process_index=1, process_count=2)
  full = get(batch_size=4)
  f = full[0]["tokens"]
  np.testing.assert_array_equal(a[0]["tokens"], f[[0, 2]])
  np.testing.assert_array_equal(b[0]["tokens"], f[[1, 3]])


def test_unigram_entropy():
  tokens = np.array([0, 0, 1, 2])
  p = np.array([0.5, 0.25, 0.25])
  assert abs(pipeline.unigram_entropy(tokens, 259) - float(-(p * np.log(p)).sum())) < 1e-12


def test_too_long_seq_len_is_a_clear_error():
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.WindowSource(np.zeros(10, np.int32), 64)


@pytest.mark.parametrize("pack,min_len", [(True, 0), (False, 0), (False, 100), (True, 100)])
def test_window_count_is_what_the_sources_give(tmp_path, pack, min_len):
  for i in range(12):
    (tmp_path / f"d{i:02d}.txt").write_text("x" * (20 + 37 * i))
  c = build_config("model=swa,scale=tiny,ctx=64").data
  c.source, c.val_fraction, c.pack_docs, c.min_doc_len = str(tmp_path), 0.3, pack, min_len
  data = Dataset.from_config(c)
  counts = data.check_splits(c.seq_len, batch_size=1)
  for split in sources.SPLITS:
    assert counts[split] == len(data.window_source(split, c.seq_len)) > 0


@pytest.mark.parametrize("knob,value,needle", [
    ("val_fraction", 0.0, "raise data.val_fraction"),
    ("seq_len", 4096, "data.seq_len=4096 is longer than the whole"),
    ("min_doc_len", 10_000, "data.min_doc_len=10000"),
    ("batch_size", 1000, "fewer than data.batch_size=1000"),
])
def test_check_splits_names_the_knob(tmp_path, knob, value, needle):
  for i in range(12):
    (tmp_path / f"d{i:02d}.txt").write_text("x" * (20 + 37 * i))
  c = build_config("model=swa,scale=tiny,ctx=64").data
  c.source, c.val_fraction = str(tmp_path), 0.3
  c[knob] = value
  with pytest.raises(ConfigError, match=re.escape(needle)):
    Dataset.from_config(c).check_splits(c.seq_len, batch_size=c.batch_size)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_data_prefetch_reads_that_many_batches_ahead(prefetch):
  """data.prefetch: with 0 the iterator reads a batch only when asked for it; with k > 0 a
  background thread reads ahead (at least one more batch than taken, at most k + 1 in all
  counting the one handed out, within grain's buffer); the batches are the same either way."""
  import threading
  import time

  import grain

  read: list[int] = []
  lock = threading.Lock()

  def record(i):
    with lock:
      read.append(int(i))
    return {"tokens": np.full((4,), i, np.int32)}

  ds = grain.MapDataset.range(40).map(record).batch(2, drop_remainder=True)
  it = pipeline.make_iterator(ds, prefetch)
  first = next(it)
  np.testing.assert_array_equal(first["tokens"][:, 0], [0, 1])
  deadline = time.monotonic() + 10
  while prefetch and len(read) <= 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)  # let a reader that would overshoot do so
  with lock:
    n = len(read)
  if prefetch:
    assert 2 < n <= 2 * (prefetch + 2), read
  else:
    assert sorted(read) == [0, 1], read
  rest = [next(it)["tokens"][:, 0].tolist() for _ in range(5)]
  assert rest == [[2 * b, 2 * b + 1] for b in range(1, 6)]


@pytest.mark.parametrize("old,new,skipped", [(4, 2, 0), (2, 4, 2), (4, 6, 0)])
def test_a_changed_batch_size_continues_after_the_windows_read(data, data_cfg, old, new, skipped):
  """Resuming with another data.batch_size (`resume.rebatched`): the saved position counts
  batches of the old size; re-counted in the new size, the next batch starts at the first
  window not yet read (rounded up to a whole batch, which skips fewer than one batch of
  windows, said in one line), shuffled across epochs alike."""
  from ttt_jax.runs.resume import rebatched  # noqa: PLC0415

  get = lambda bs: data.windows("train", data_cfg.seq_len, seed=1, shuffle=True,  # noqa: E731
                                batch_size=bs)
  flat = get(1)  # the same shuffled stream, one window per batch
  it = pipeline.make_iterator(get(old), prefetch=0)
  for _ in range(3):
    next(it)
  lines = []
  state = rebatched(it.get_state(), old, new, echo=lines.append)
  it2 = pipeline.make_iterator(get(new), prefetch=0)
  it2.set_state(state)
  start = 3 * old + skipped
  np.testing.assert_array_equal(next(it2)["tokens"],
                                np.concatenate([flat[start + i]["tokens"] for i in range(new)]))
  assert lines == [f"data.batch_size changed from {old} to {new}: the data continues after the "
                   f"{3 * old} windows read so far"
                   + (f" ({skipped} skipped, to start a whole batch)" if skipped else "")]
  assert rebatched(it.get_state(), old, old, echo=lines.append) == it.get_state()


def test_data_without_a_window_is_one_line_naming_the_key():
  """Documents that leave no window (here: none is long enough) raise the ConfigError the
  scripts print in one line, not a ValueError with a traceback."""
  with pytest.raises(ConfigError, match=r"^no window of data.seq_len=64 fits the data \(0 "
                                        r"documents with >= 1000 tokens\)$"):
    pipeline.DocumentWindows([10, 20], lambda i: np.zeros(5, np.int32), seq_len=64, bos_id=1,
                             eos_id=2, min_len=1000)
