"""prepare -> ArrayRecord shards -> grain windows: exact tokens, order, sharding, resume, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import pipeline, prepare, sources
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.prepared import PreparedData
from ttt_jax.data.tokenizers import get_tokenizer

TEXTS = {
    "a/long.txt": " ".join(f"long{i}" for i in range(800)) + " Ende: Grüße 🚀",
    "a/mid.md": "# Title\n\n" + " ".join(f"md{i}" for i in range(300)),
    "b/short.py": "print('hi')\n",
    "b/tiny.txt": "x",
    "c/other.txt": " ".join(f"other{i}" for i in range(150)),
    "c/skip.bin": "not a text suffix",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("books")
  for rel, text in TEXTS.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  (root / "c" / "latin1.txt").write_bytes(b"caf\xe9 au lait \xff\xfe end")
  return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("prep") / "data"
  meta = prepare.prepare(str(corpus), str(out), val_fraction=0.0, num_shards=3, echo=lambda s: 0)
  return out, meta


def _cfg(source, seq_len=32, **kw):
  c = build_config(f"model=swa,scale=tiny,ctx={seq_len}").data
  c.source = str(source)
  c.val_fraction = 0.0
  for k, v in kw.items():
    c[k] = v
  return c


def _windows(source, seq_len=32, split="train", **kw):
  return Dataset.from_config(_cfg(source, seq_len, **kw)).window_source(split, seq_len)


def test_every_document_comes_back_exactly(corpus, prepared):
  out, meta = prepared
  data = PreparedData(str(out))
  part = data.split("train")
  tok = get_tokenizer("bytes")
  expect = {n: t for n, t in sources.get_documents(str(corpus), None)}
  assert sorted(part.names) == sorted(expect) and "c/skip.bin" not in part.names
  for i, name in enumerate(part.names):
    np.testing.assert_array_equal(part[i], tok.encode(expect[name]))
    assert part.lengths[i] == len(part[i])
  tr = meta["splits"]["train"]
  assert tr["documents"] == len(expect) and len(tr["shards"]) == 3
  assert tr["tokens"] == sum(len(tok.encode(t)) for t in expect.values())
  assert sum(tr["length_histogram"]["counts"]) == len(expect)
  assert meta["undecodable"] == {"bytes": 3, "documents": 1}  # \xe9, \xff, \xfe
  assert "\ufffd" in tok.decode(part[part.names.index("c/latin1.txt")])


def test_packed_windows_equal_the_in_memory_stream(corpus, prepared):
  out, _ = prepared
  L = 32
  src = _windows(out, L)
  part = PreparedData(str(out)).split("train")
  stream = pipeline.build_stream_from_arrays((part[i] for i in range(len(part))), part.names,
                                             get_tokenizer("bytes"))
  ref = pipeline.WindowSource(stream.tokens, L)
  assert len(src) == len(ref)
  for i in range(len(src)):
    np.testing.assert_array_equal(src[i]["tokens"], ref[i]["tokens"])


def test_long_document_windows_stay_inside_documents(prepared):
  out, _ = prepared
  L = 64
  src = _windows(out, L, pack_docs=False, min_doc_len=L)
  part = PreparedData(str(out)).split("train")
  tok = get_tokenizer("bytes")
  expect = []
  for i in range(len(part)):
    if part.lengths[i] >= L:
      full = np.concatenate([[tok.bos_id], part[i], [tok.eos_id]])
      expect += [full[j * L:j * L + L + 1] for j in range((len(full) - 1) // L)]
  assert len(src) == len(expect) > 0
  for i, e in enumerate(expect):
    np.testing.assert_array_equal(src[i]["tokens"], e)


def test_order_is_deterministic_per_seed_and_processes_are_disjoint(prepared):
  out, _ = prepared
  data = Dataset.from_config(_cfg(out, 16))
  n = len(data.window_source("train", 16))
  get = lambda seed, pi=0, pc=1: data.windows(
      "train", 16, seed=seed, shuffle=True, batch_size=2, process_index=pi, process_count=pc)
  a, b, c = get(1), get(1), get(2)
  np.testing.assert_array_equal(a[3]["tokens"], b[3]["tokens"])
  assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(4))
  # two processes: disjoint windows that together cover an epoch
  src = data.window_source("train", 16)
  key = {src[i]["tokens"].tobytes(): i for i in range(n)}
  seen = []
  for pi in range(2):
    ds = data.windows("train", 16, seed=0, shuffle=False, batch_size=1, process_index=pi,
                      process_count=2)
    seen.append({key[ds[j]["tokens"][0].tobytes()] for j in range(len(range(pi, n, 2)))})
  assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(n))


def test_resume_mid_epoch_continues_with_next_unseen_window(prepared):
  out, _ = prepared
  data = Dataset.from_config(_cfg(out, 16))
  n = len(data.window_source("train", 16))
  ds = data.windows("train", 16, seed=5, shuffle=True, batch_size=1)
  it = pipeline.make_iterator(ds)
  first = [next(it)["tokens"][0].tobytes() for _ in range(n // 2)]
  state = it.get_state()
  it2 = pipeline.make_iterator(ds)
  it2.set_state(state)
  rest = [next(it2)["tokens"][0].tobytes() for _ in range(n - n // 2)]
  expect = [next(it)["tokens"][0].tobytes() for _ in range(n - n // 2)]
  assert rest == expect
  # one epoch = every window exactly once
  src = data.window_source("train", 16)
  assert sorted(first + rest) == sorted(src[i]["tokens"].tobytes() for i in range(n))


def test_rerun_is_a_noop_and_changes_need_force(corpus, prepared, tmp_path):
  out, meta = prepared
  mtime = os.path.getmtime(out / "metadata.json")
  again = prepare.prepare(str(corpus), str(out), val_fraction=0.0, num_shards=3, echo=lambda s: 0)
  assert again["fingerprint"] == meta["fingerprint"]
  assert os.path.getmtime(out / "metadata.json") == mtime
  with pytest.raises(ConfigError, match="--force"):
    prepare.prepare(str(corpus), str(out), val_fraction=0.0, num_shards=2, echo=lambda s: 0)
  copy = tmp_path / "copy"
  prepare.prepare(str(corpus), str(copy), val_fraction=0.0, num_shards=3, echo=lambda s: 0)
  prepare.prepare(str(corpus), str(copy), val_fraction=0.0, num_shards=2, force=True,
                  echo=lambda s: 0)
  assert len(json.loads((copy / "metadata.json").read_text())["splits"]["train"]["shards"]) == 2
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_bad_inputs_fail_with_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "blank.txt").write_text("   \n")
  cases = [(str(tmp_path / "missing"), "no such file"),
           (str(tmp_path / "empty"), "no non-empty documents")]
  for src, msg in cases:
    with pytest.raises(ConfigError, match=msg) as e:
      prepare.prepare(src, str(tmp_path / "out"), echo=lambda s: 0)
    assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "out")


def test_jsonl_bpe_parallel_and_vocab_follows_tokenizer(tmp_path):
  lines = [json.dumps({"text": f"document {i}: " + "naïve words repeat " * (5 + i)})
           for i in range(40)]
  (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = tmp_path / "prep"
  meta = prepare.prepare(str(tmp_path / "d.jsonl"), str(out), train_tokenizer="bpe",
                         vocab_size=300, workers=2, val_fraction=0.2, echo=lambda s: 0)
  data = PreparedData(str(out))
  tok = data.tokenizer()
  assert meta["tokenizer"]["kind"] == "hf" and 256 < tok.vocab_size <= 300  # few merges exist
  assert meta["tokenizer"]["vocab_size"] == tok.vocab_size
  docs = dict(sources.get_documents(str(tmp_path / "d.jsonl"), None))
  for split in ("train", "validation"):
    part = data.split(split)
    for i, name in enumerate(part.names):
      assert tok.decode(part[i]) == docs[name]
  assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == 40
  c = build_config("model=e2e,scale=tiny,ctx=128")
  c.data.source = str(out)
  resolved = Dataset.from_config(c.data)
  assert resolved.prepared is not None and resolved.vocab_size == tok.vocab_size
  resolved.sync_vocab(c)
  assert c.model.vocab_size == tok.vocab_size
  c.model.vocab_size = 512
  with pytest.raises(ConfigError, match="model.vocab_size=512"):
    resolved.sync_vocab(c)


def test_out_dir_that_is_a_file_fails_in_one_line(corpus, tmp_path):
  (tmp_path / "f").write_text("a file")
  with pytest.raises(ConfigError, match=r"--out_dir=.*/f' is a file, not a folder"):
    prepare.prepare(str(corpus), str(tmp_path / "f"), echo=lambda s: 0)
  assert (tmp_path / "f").read_text() == "a file"
  with pytest.raises(ConfigError, match=r"--out_dir=.*/f/data': cannot create a folder there "
                                        r"\(Not a directory: .*/f/data.tmp-\d+\)$"):
    prepare.prepare(str(corpus), str(tmp_path / "f" / "data"), echo=lambda s: 0)


def test_folders_left_by_killed_runs_are_removed(corpus, tmp_path):
  """A SIGKILLed prepare_data leaves OUT.tmp-PID (no cleanup runs); the next run removes the
  ones whose process is gone, with a notice, and leaves a running one's alone."""
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  out = tmp_path / "data"
  dead, alive = tmp_path / f"data.tmp-{gone.pid}", tmp_path / f"data.tmp-{os.getppid()}"
  for d in (dead, alive):
    d.mkdir()
    (d / "train-00000-of-00001.array_record").write_bytes(b"partial")
  logs = []
  prepare.prepare(str(corpus), str(out), val_fraction=0.0, num_shards=1, echo=logs.append)
  assert not dead.exists() and alive.exists()
  assert any(s.startswith(f"notice: removed {dead}, left by a prepare_data run") for s in logs)


def test_an_imported_tokenizers_declared_specials_survive_preparation(tmp_path, word_tokenizer):
  """A tokenizer whose BOS/EOS/add_bos come from its config files (an imported model's) is stored
  with them: the prepared folder's tokenizer frames documents with the same ids."""
  from ttt_jax.data.tokenizers import get_tokenizer  # noqa: PLC0415

  src_tok = tmp_path / "tok"
  src_tok.mkdir()
  word_tokenizer(src_tok, ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz "], "<unk>")
  (src_tok / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "</s>", "eos_token": "<s>", "pad_token": "<unk>", "add_bos_token": False}))
  source = get_tokenizer(f"hf:{src_tok}")
  assert (source.bos_id, source.eos_id, source.add_bos) == (2, 1, False)  # not the names' guess
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(6):
    (docs / f"d{i}.txt").write_text("some words here " * (3 + i))
  meta = prepare.prepare(str(docs), str(tmp_path / "out"), f"hf:{src_tok}", val_fraction=0.3,
                         echo=lambda s: 0)
  stored = PreparedData(str(tmp_path / "out")).tokenizer()
  assert (stored.bos_id, stored.eos_id, stored.add_bos) == (2, 1, False)
  assert stored.fingerprint() == source.fingerprint() == meta["tokenizer"]["fingerprint"]
