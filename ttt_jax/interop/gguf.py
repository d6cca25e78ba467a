"""GGUF files (llama.cpp's format) of Llama-family models -> a run directory.

Tensors are dequantized to float32 with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K and every other type `gguf.quants` can dequantize) and renamed to Hugging Face names, then
mapped as any HF checkpoint (interop/llama.py). GGUF stores the rows of Q and K permuted for
RoPE over interleaved pairs (2i, 2i+1); this package rotates half-split pairs (i, i + d/2), so
the permutation is undone per head. The tokenizer is rebuilt from the file's metadata as a
`tokenizers` byte-level BPE (vocabulary, merges, special tokens, pre-tokenizer); BOS, EOS (+ EOT,
EOM: every id that ends a generation), PAD, add_bos_token and the chat template are the file's
`tokenizer.ggml.*` / `tokenizer.chat_template` values, never guessed from token names (a file
without a PAD id pads with EOS, so no id the checkpoint has no row for enters the vocabulary).
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from ttt_jax.data.special_tokens import DeclaredSpecials
from ttt_jax.data.tokenizers import HFTokenizer
from ttt_jax.interop.llama import (
    ConvertError,
    LlamaSpec,
    already_imported,
    hf_to_params,
    import_request,
    write_workdir,
)

ARCHITECTURES = ("llama",)
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# pre-tokenizer regexes by `tokenizer.ggml.pre` (the split rules of the original tokenizers)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3")


def hf_name(name: str) -> str:
  """GGUF tensor name -> HF name (ConvertError naming an unknown one)."""
  if name in GLOBAL_NAMES:
    return GLOBAL_NAMES[name]
  m = _BLOCK.fullmatch(name)
  if m and m.group(2) in BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"
  raise ConvertError(f"unknown GGUF tensor {name!r}; only Llama-family weights are supported")


def interleaved_to_half_split(w: np.ndarray, heads: int) -> np.ndarray:
  """Rows of a Q/K projection [heads*d, D] in GGUF's interleaved-RoPE order -> half-split."""
  d = w.shape[0] // heads
  return w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def half_split_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `interleaved_to_half_split` (what GGUF converters apply)."""
  d = w.shape[0] // heads
  return w.reshape(heads, 2, d // 2, -1).swapaxes(1, 2).reshape(w.shape)


def field(reader: gguf.GGUFReader, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def dequantize(tensor) -> np.ndarray:
  """One reader tensor as float32 in numpy order ([rows, cols] = [out, in])."""
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  try:
    w = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
  except NotImplementedError:
    raise ConvertError(f"GGUF tensor {tensor.name!r}: quantization {qtype.name} cannot be "
                       "dequantized by the gguf package") from None
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(w, np.float32).reshape(shape)


def read_spec(reader: gguf.GGUFReader, where: str) -> LlamaSpec:
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ConvertError(f"{where}: architecture {arch!r} not supported; supported: "
                       f"{', '.join(ARCHITECTURES)}")
  get = lambda key, default=None: field(reader, f"{arch}.{key}", default)  # noqa: E731
  heads = int(get("attention.head_count"))
  d = int(get("embedding_length"))
  rope_dim = get("rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != d // heads:
    raise ConvertError(f"{where}: {arch}.rope.dimension_count={rope_dim} (partial RoPE) not "
                       "supported")
  if field(reader, f"{arch}.rope.scaling.type", "none") not in ("none",):
    raise ConvertError(f"{where}: {arch}.rope.scaling.type="
                       f"{field(reader, f'{arch}.rope.scaling.type')!r} not supported")
  names = {t.name for t in reader.tensors}
  vocab = get("vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []))
  if not vocab:
    vocab = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
  return LlamaSpec(
      vocab_size=int(vocab), hidden_size=d, intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(get("attention.head_count_kv", heads)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      tie_word_embeddings="output.weight" not in names,
      max_position_embeddings=int(get("context_length", 0)),  # 0: not stated
      bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"))


def read_tensors(reader: gguf.GGUFReader, spec: LlamaSpec) -> dict[str, np.ndarray]:
  """Every tensor dequantized, under its HF name, Q/K back in half-split RoPE order."""
  out = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      raise ConvertError("GGUF tensor 'rope_freqs.weight' (scaled RoPE) not supported")
    name = hf_name(t.name)
    w = dequantize(t)
    if name.endswith("q_proj.weight"):
      w = interleaved_to_half_split(w, spec.num_attention_heads)
    elif name.endswith("k_proj.weight"):
      w = interleaved_to_half_split(w, spec.num_key_value_heads)
    out[name] = w
  return out


def gguf_tokenizer(reader: gguf.GGUFReader, where: str) -> HFTokenizer:
  """The file's BPE tokenizer as a `tokenizers.Tokenizer` behind the package's interface."""
  model = field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ConvertError(f"{where}: tokenizer.ggml.model={model!r} not supported (only 'gpt2', "
                       "byte-level BPE); import with --tokenizer SPEC")
  pre = field(reader, "tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ConvertError(f"{where}: tokenizer.ggml.pre={pre!r} not supported; supported: "
                       f"{', '.join(PRE_TOKENIZERS)}")
  tokens = field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
  types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  tk = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                       ignore_merges=pre in ("llama-bpe", "llama3")))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama-bpe", "llama3"):
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tk.pre_tokenizer = byte_level
  tk.decoder = decoders.ByteLevel()
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types, strict=True)
             if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
  tk.add_special_tokens(special)
  return HFTokenizer(tk, f"gguf:{where}", declared_specials(reader, len(tokens), where))


def declared_specials(reader: gguf.GGUFReader, vocab: int, where: str) -> DeclaredSpecials:
  """BOS / EOS ids (EOS, EOT, EOM) / PAD / add_bos_token / chat template of the metadata."""

  def token_id(name: str) -> int | None:
    i = field(reader, f"tokenizer.ggml.{name}_token_id")
    if i is not None and not 0 <= int(i) < vocab:
      raise ConvertError(f"{where}: tokenizer.ggml.{name}_token_id={i} is outside the "
                         f"vocabulary of {vocab} tokens")
    return None if i is None else int(i)

  stops = [i for i in map(token_id, ("eos", "eot", "eom")) if i is not None]
  add_bos = field(reader, "tokenizer.ggml.add_bos_token")
  return DeclaredSpecials(bos=token_id("bos"), eos=tuple(dict.fromkeys(stops)),
                          pad=token_id("padding"),
                          add_bos=None if add_bos is None else bool(add_bos),
                          chat_template=field(reader, "tokenizer.chat_template"))


def import_gguf(path: str, out: str, *, seq_len: int = 2048, data_source: str = "embedded",
                val_fraction: float = 0.05, overwrite: bool = False, echo=print):
  """A GGUF Llama file -> a run directory (config, Orbax params, tokenizer.json). Returns its
  config, or None when `out` already holds this import (nothing is converted again)."""
  where = f"gguf:{path}"
  if not os.path.isfile(path):
    raise ConvertError(f"{where}: no such file")
  record = import_request(path, seq_len=seq_len, data_source=data_source,
                          val_fraction=val_fraction)
  if already_imported(out, record, overwrite=overwrite, echo=echo):
    return None
  try:
    reader = gguf.GGUFReader(path)
  except (OSError, ValueError) as e:
    raise ConvertError(f"{where}: not a readable GGUF file ({e})") from None
  spec = read_spec(reader, where)
  tok = gguf_tokenizer(reader, where)
  params = hf_to_params(read_tensors(reader, spec), spec, tok.vocab_size, where)
  return write_workdir(out, params, spec, tok, seq_len=seq_len, data_source=data_source,
                       val_fraction=val_fraction, overwrite=overwrite, record=record, echo=echo)
