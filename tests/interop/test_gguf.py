"""GGUF import: a tiny Llama written with the gguf writer (2 layers, GQA 4:2, 264 tokens, Q/K
permuted for interleaved RoPE as GGUF converters store them) against the NumPy forward pass;
dequantization of each supported type against gguf.quants; the tokenizer from metadata."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers

from ttt_jax.interop.gguf import (
    ConvertError,
    dequantize,
    gguf_tokenizer,
    half_split_to_interleaved,
    import_gguf,
    interleaved_to_half_split,
)
from ttt_jax.runs.load import load_run

from .llama_reference import llama_logits, random_llama

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
MERGES = ["h e", "l l", "he ll", "o r", "Ġ w"]


def byte_alphabet() -> list[str]:
  return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_vocab() -> list[str]:
  """Three control tokens (SmolLM2's first three) + 256 byte symbols + the merges' products:
  264 tokens."""
  return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_alphabet(),
          *[m.replace(" ", "") for m in MERGES]]


def gguf_name(hf: str) -> str:
  if hf == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf == "model.norm.weight":
    return "output_norm.weight"
  if hf == "lm_head.weight":
    return "output.weight"
  _, _, layer, rest = hf.split(".", 3)
  return f"blk.{layer}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(path, cfg, tensors, *, arch="llama", extra=None, specials=None, context=256):
  """A GGUF file of the HF-named `tensors`; `specials` the tokenizer metadata among bos, eos,
  eot, pad, add_bos, chat_template (default: bos = eos = 0); `context` its context_length
  (None: not stated)."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  if context is not None:
    w.add_context_length(context)
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  vocab = tiny_vocab()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(vocab)
  w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL
                     for t in vocab])
  w.add_token_merges(MERGES)
  writers = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
             "pad": w.add_pad_token_id, "add_bos": w.add_add_bos_token,
             "chat_template": w.add_chat_template}
  for key, value in ({"bos": 0, "eos": 0} if specials is None else specials).items():
    writers[key](value)
  for name, t in tensors.items():
    if name.endswith("q_proj.weight"):
      t = half_split_to_interleaved(t, cfg["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      t = half_split_to_interleaved(t, cfg["num_key_value_heads"])
    w.add_tensor(gguf_name(name), t)
  for name, t in (extra or {}).items():
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_rope_permutation_round_trips():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)
  p = half_split_to_interleaved(w, 6)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(interleaved_to_half_split(p, 6), w)
  # one head of d=4: half-split rows (0, 1 | 2, 3) rotate pairs (0,2), (1,3); interleaved (0,1)
  np.testing.assert_array_equal(half_split_to_interleaved(np.arange(4.0)[:, None], 1)[:, 0],
                                [0, 2, 1, 3])


def test_a_gguf_without_context_length_records_an_unknown_trained_context(tmp_path):
  cfg, tensors = random_llama(seed=5, vocab_size=len(tiny_vocab()))
  path = write_gguf(tmp_path / "m.gguf", cfg, tensors, context=None)
  config = import_gguf(path, str(tmp_path / "run"), seq_len=64, echo=None)
  assert config.model.trained_context == 0  # unknown: no warning about longer contexts


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_import_matches_numpy_llama(tmp_path, tied):
  cfg, tensors = random_llama(seed=3, tied=tied, vocab_size=len(tiny_vocab()))
  path = write_gguf(tmp_path / "m.gguf", cfg, tensors)
  config = import_gguf(path, str(tmp_path / "run"), seq_len=64, echo=None)
  m = config.model
  assert (m.num_kv_heads, m.tie_embeddings, m.rope_theta) == (2, tied, cfg["rope_theta"])
  assert cfg["rope_theta"] != 1e4 and (m.trained_context, config.data.seq_len) == (256, 64)
  run = load_run(str(tmp_path / "run"))
  tok = run.data.tokenizer
  ids = tok.encode("hello world 42")
  assert tok.decode(ids) == "hello world 42"
  assert ids[0] == tiny_vocab().index("hell") and len(ids) == 9  # hell o Ġw or l d Ġ 4 2
  tokens = np.concatenate([[tok.bos_id], ids])
  logits, _ = nnx.merge(run.graphdef, run.params)(jnp.asarray(tokens)[None])
  ref = llama_logits(cfg, tensors, tokens)
  np.testing.assert_allclose(np.asarray(logits[0, :, :cfg["vocab_size"]]), ref, rtol=2e-4,
                             atol=2e-4)


QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"]


@pytest.mark.parametrize("qname", QUANTS)
def test_dequantization_matches_gguf_reference(tmp_path, qname):
  qtype = getattr(gguf.GGMLQuantizationType, qname)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((6, 512)).astype(np.float32)
  if qname == "Q4_K":  # gguf has no Q4_K quantizer: random blocks with finite f16 scales
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (6, 512 // block * size), dtype=np.uint8)
    scales = raw.reshape(6, -1, size)[:, :, :4].view(np.float16)
    scales[...] = rng.uniform(-0.01, 0.01, scales.shape).astype(np.float16)
  else:
    raw = gguf.quants.quantize(w, qtype)
  writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
  writer.add_tensor("t", raw, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tensor = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors[0]
  got = dequantize(tensor)
  want = gguf.quants.dequantize(raw, qtype)
  assert got.shape == (6, 512) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want.astype(np.float32))
  if qname != "Q4_K":
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}.get(qname, 0.35)
    assert np.max(np.abs(got - w)) <= tol * np.max(np.abs(w))


def test_unknown_tensor_and_architecture_fail_in_one_line(tmp_path):
  cfg, tensors = random_llama(vocab_size=len(tiny_vocab()))
  path = write_gguf(tmp_path / "x.gguf", cfg, tensors,
                    extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
  with pytest.raises(ConvertError, match=r"unknown GGUF tensor 'blk.0.attn_q.bias'"):
    import_gguf(path, str(tmp_path / "r"), echo=None)
  path = write_gguf(tmp_path / "y.gguf", cfg, tensors, arch="qwen2")
  with pytest.raises(ConvertError, match="architecture 'qwen2' not supported"):
    import_gguf(path, str(tmp_path / "r"), echo=None)


def test_tokenizer_specials_are_not_split(tmp_path):
  cfg, tensors = random_llama(vocab_size=len(tiny_vocab()))
  reader = gguf.GGUFReader(write_gguf(tmp_path / "t.gguf", cfg, tensors))
  tok = gguf_tokenizer(reader, "t.gguf")
  end = tiny_vocab().index("<|im_end|>")
  assert list(tok.encode("he<|im_end|>")) == [tiny_vocab().index("he"), end]
  # the file's ids; no PAD id in the file: EOS pads, no id is added to the vocabulary
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (0, 0, 0, (0,))
  assert tok.vocab_size == len(tiny_vocab())


def test_an_imported_run_opens_after_its_folder_moved(tmp_path):
  """The import names its tokenizer files by absolute path; the run's copy of its tokenizer
  (<workdir>/tokenizer) serves once the folder and the GGUF file have moved."""
  cfg, tensors = random_llama(seed=6, vocab_size=len(tiny_vocab()))
  import_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors), str(tmp_path / "run"), seq_len=64,
              echo=None)
  before = load_run(str(tmp_path / "run")).data.tokenizer
  (tmp_path / "run").rename(tmp_path / "moved")
  (tmp_path / "m.gguf").rename(tmp_path / "elsewhere.gguf")
  after = load_run(str(tmp_path / "moved")).data.tokenizer
  assert after.fingerprint() == before.fingerprint()
  assert list(after.encode("hello world 42")) == list(before.encode("hello world 42"))
