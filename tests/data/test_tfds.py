"""A TFDS dataset built offline from text files reads back the same tokens as the files."""

import numpy as np
import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data import prepare, sources
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.prepared import PreparedData
from ttt_jax.data.tokenizers import get_tokenizer

tfds = pytest.importorskip("tensorflow_datasets",
                           reason="tensorflow-datasets not installed (pip install -e '.[tfds]')")

DOCS = {f"doc{i:02d}.txt": " ".join(f"w{i}_{j} Grüße" for j in range(30 + 7 * i))
        for i in range(12)}


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Text files -> examples {'name', 'text'}; train and validation splits."""

  VERSION = tfds.core.Version("1.0.0")
  root = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"name": tfds.features.Text(), "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    names = sorted(DOCS)
    return {"train": self._generate_examples(names[:9]),
            "validation": self._generate_examples(names[9:])}

  def _generate_examples(self, names):
    for n in names:
      yield n, {"name": n, "text": (self.root / n).read_text(encoding="utf-8")}


class LocalTrainOnly(LocalText):
  """The same files, all in one train split."""

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(sorted(DOCS))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("texts")
  for n, t in DOCS.items():
    (root / n).write_text(t, encoding="utf-8")
  LocalText.root = root
  data_dir = tmp_path_factory.mktemp("tfds")
  LocalText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return root, data_dir


def _by_name(src):
  return {src[i]["name"].decode(): src[i]["text"].decode() for i in range(len(src))}


def test_tfds_source_gives_the_text_files_tokens(built):
  root, data_dir = built
  tok = get_tokenizer("bytes")
  src = sources.tfds_source("local_text", "train", str(data_dir))
  docs = list(sources.get_documents("tfds:local_text", "train", tfds_data_dir=str(data_dir)))
  names = _by_name(src)
  assert len(docs) == 9
  for (doc_name, text), i in zip(docs, range(len(src)), strict=True):
    name = src[i]["name"].decode()
    assert doc_name == f"local_text:train:{i}"
    np.testing.assert_array_equal(tok.encode(text),
                                  tok.encode((root / name).read_text(encoding="utf-8")))
  assert sorted(names) == sorted(DOCS)[:9]
  val = list(sources.get_documents("tfds:local_text", "validation", tfds_data_dir=str(data_dir)))
  assert sorted(t for _, t in val) == sorted(DOCS[n] for n in sorted(DOCS)[9:])


def test_tfds_through_the_pipeline_and_prepare(built, tmp_path):
  root, data_dir = built
  c = build_config("model=swa,scale=tiny,ctx=32").data
  c.source, c.tfds_data_dir = "tfds:local_text", str(data_dir)
  data = Dataset.from_config(c)
  assert data.kind == "tfds"
  stream = data.stream("train")
  ds = data.windows("train", 32, seed=0, shuffle=False, batch_size=2)
  np.testing.assert_array_equal(ds[0]["tokens"][1], stream.tokens[32:65])
  meta = prepare.prepare("tfds:local_text:train", str(tmp_path / "p"), val_fraction=0.0,
                         num_shards=2, tfds_data_dir=str(data_dir), echo=lambda s: 0)
  assert meta["splits"]["train"]["tokens"] == sum(len(t.encode()) for t in
                                                  [DOCS[n] for n in sorted(DOCS)[:9]])
  part = PreparedData(str(tmp_path / "p")).split("train")
  got = sorted(get_tokenizer("bytes").decode(part[i]) for i in range(len(part)))
  assert got == sorted(DOCS[n] for n in sorted(DOCS)[:9])


def test_every_document_of_a_dataset_without_a_held_out_split(built):
  root, data_dir = built
  LocalTrainOnly(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  docs = list(sources.get_documents("tfds:local_train_only", None, tfds_data_dir=str(data_dir)))
  assert sorted(t for _, t in docs) == sorted(DOCS.values())
  both = list(sources.get_documents("tfds:local_text", None, tfds_data_dir=str(data_dir)))
  assert sorted(t for _, t in both) == sorted(DOCS.values())  # train + validation
  assert sources.tfds_all_splits("x", ["test", "train"]) == ["train", "test"]
  assert sources.tfds_all_splits("x", ["validation"]) == ["validation"]
  with pytest.raises(ConfigError, match="no train, validation or test split"):
    sources.tfds_all_splits("x", ["extra"])


def test_data_flag_with_a_tfds_source(built):
  """`--data tfds:NAME` through Dataset.with_source: 'all' is train + validation (9 + 3 documents),
  tokenized with the run's tokenizer; `:validation` restricts it."""
  root, data_dir = built
  c = build_config("model=swa,scale=tiny,ctx=32").data
  c.tfds_data_dir = str(data_dir)
  data = Dataset.from_config(c).with_source("tfds:local_text")
  assert (data.kind, data.flag) == ("tfds", "--data")
  every = data.stream("all")
  assert len(every.names) == len(DOCS) == 12 and len(data.stream("validation").names) == 3
  tok = get_tokenizer("bytes")
  assert sorted(every.doc_lengths - 2) == sorted(len(tok.encode(t)) for t in DOCS.values())
  only_val = Dataset.from_config(c).with_source("tfds:local_text:validation")
  assert len(only_val.stream("all").names) == 3
