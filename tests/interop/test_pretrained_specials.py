"""Special tokens of imported models come from the model's files: GGUF `tokenizer.ggml.*`
metadata, HF tokenizer_config.json / generation_config.json / config.json. No id the checkpoint
has no row for is ever predicted; generation starts with BOS only when the files say so, stops
at any of their EOS ids, and `chat` applies their chat template. Tiny random Llamas (2 layers,
264 tokens) against the NumPy forward pass."""

from __future__ import annotations

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.eval import generate as G
from ttt_jax.interop.gguf import gguf_tokenizer, import_gguf
from ttt_jax.interop.hf import export_hf, import_hf
from ttt_jax.runs.load import load_run

from .llama_reference import llama_logits, random_llama
from .test_gguf import tiny_vocab, write_gguf
from .test_hf import write_hf

V = len(tiny_vocab())
BOS, EOS = tiny_vocab().index("<|im_start|>"), tiny_vocab().index("<|im_end|>")
SMOLLM2_TEMPLATE = (  # tokenizer.chat_template of SmolLM2-135M-Instruct's GGUF file
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2 = {"bos": BOS, "eos": EOS, "add_bos": False, "chat_template": SMOLLM2_TEMPLATE}


def random_text(rng, n: int = 12) -> str:
  return "".join(rng.choice(list("helowrd 0123"), n))


def import_tiny(tmp_path, name, specials, seed=0):
  cfg, tensors = random_llama(seed=seed, tied=True, vocab_size=V)
  path = write_gguf(tmp_path / f"{name}.gguf", cfg, tensors, specials=specials)
  import_gguf(path, str(tmp_path / name), seq_len=64, echo=None)
  return cfg, tensors, load_run(str(tmp_path / name))


def greedy_reference(cfg, tensors, ids, n: int) -> list[int]:
  """n greedy tokens of the NumPy Llama after `ids` (argmax over the checkpoint's vocabulary)."""
  seq = [int(i) for i in ids]
  for _ in range(n):
    seq.append(int(np.argmax(llama_logits(cfg, tensors, np.asarray(seq))[-1])))
  return seq[len(ids):]


@pytest.mark.parametrize("pad", [None, 0])
def test_gguf_specials_are_the_files_and_no_rowless_id_is_predicted(tmp_path, pad):
  specials = dict(SMOLLM2, **({} if pad is None else {"pad": pad}))
  _, _, run = import_tiny(tmp_path, "run", specials, seed=4)
  tok = run.data.tokenizer  # read back from the run directory, not the GGUF file
  assert (tok.bos_id, tok.eos_id) == (BOS, EOS)
  assert tok.pad_id == (EOS if pad is None else pad)
  assert tok.vocab_size == V and run.config.model.vocab_size == V  # nothing added
  rng = np.random.default_rng()
  tokens = rng.integers(0, V, (1, 16))
  logits, _ = nnx.merge(run.graphdef, run.params)(jnp.asarray(tokens))
  assert logits.shape[-1] == 384 and np.all(np.asarray(logits[..., V:]) < -1e8)
  assert tok.stop_ids == (EOS,) and tok.add_bos is False
  assert tok.chat_template == SMOLLM2_TEMPLATE


def test_generation_starts_and_stops_as_the_files_say(tmp_path):
  rng = np.random.default_rng(7)
  prompt = random_text(rng)
  cfg, tensors, run = import_tiny(tmp_path, "a", SMOLLM2, seed=5)
  tok = run.data.tokenizer
  ids = tok.encode(prompt)  # add_bos_token = False: no BOS before the prompt
  assert G.prompt_ids(tok, "").tolist() == [BOS]  # nothing to start from but BOS
  ref = greedy_reference(cfg, tensors, ids, 10)
  cut = ref[:ref.index(EOS)] if EOS in ref else ref
  assert G.generate_text(run, prompt, 10, progress=False) == tok.decode(cut)
  # a second end-of-generation id (EOT) the model reaches after k tokens: generation stops there
  k = next(i for i in range(2, len(cut)) if cut[i] not in cut[:i])
  _, _, run = import_tiny(tmp_path, "b", dict(SMOLLM2, eot=cut[k]), seed=5)
  tok = run.data.tokenizer
  assert tok.stop_ids == (EOS, cut[k])
  new = G.generate(run.graphdef, run.params, run.config.model, ids[None], 10,
                   eos_id=tok.stop_ids)
  assert new[0].tolist() == cut[:k + 1]  # decoding ended at the stop id
  assert G.generate_text(run, prompt, 10, progress=False) == tok.decode(cut[:k])


def test_bos_is_prepended_when_the_file_says_so(tmp_path):
  _, _, run = import_tiny(tmp_path, "run", dict(SMOLLM2, add_bos=True), seed=6)
  prompt = random_text(np.random.default_rng())
  ids = G.prompt_ids(run.data.tokenizer, prompt)
  assert ids[0] == BOS and ids[1:].tolist() == run.data.tokenizer.encode(prompt).tolist()


def test_chat_prompt_is_the_files_template(tmp_path):
  cfg, tensors, run = import_tiny(tmp_path, "run", SMOLLM2, seed=8)
  tok = run.data.tokenizer
  question = random_text(np.random.default_rng())
  ids = G.prompt_ids(tok, question, chat=True)
  want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          f"Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
  assert ids.tolist() == tok.encode(want).tolist() and ids[0] == BOS
  assert (ids == EOS).sum() == 2  # specials are single ids, not spelled out
  ref = greedy_reference(cfg, tensors, ids, 6)
  cut = ref[:ref.index(EOS)] if EOS in ref else ref
  assert G.generate_text(run, question, 6, chat=True, progress=False) == tok.decode(cut)


def test_hf_import_reads_the_folders_config_files_and_exports_them(tmp_path):
  cfg, tensors = random_llama(seed=9, vocab_size=V)
  folder = write_hf(tmp_path / "hf", cfg, tensors)
  reader = gguf.GGUFReader(write_gguf(tmp_path / "t.gguf", cfg, tensors))
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    f.write(gguf_tokenizer(reader, "t.gguf").to_str())
  eot = int(np.random.default_rng().integers(3, V))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
               "add_bos_token": False, "chat_template": SMOLLM2_TEMPLATE}, f)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": BOS, "eos_token_id": [EOS, eot]}, f)
  import_hf(folder, str(tmp_path / "run"), seq_len=64, echo=None)
  want = (BOS, EOS, EOS, V, (EOS, eot), False, SMOLLM2_TEMPLATE)
  have = lambda t: (t.bos_id, t.eos_id, t.pad_id, t.vocab_size, t.stop_ids,  # noqa: E731
                    t.add_bos, t.chat_template)
  assert have(load_run(str(tmp_path / "run")).data.tokenizer) == want
  export_hf(str(tmp_path / "run"), str(tmp_path / "out"), echo=None)
  import_hf(str(tmp_path / "out"), str(tmp_path / "again"), seq_len=64, echo=None)
  assert have(load_run(str(tmp_path / "again")).data.tokenizer) == want
