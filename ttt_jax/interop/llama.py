"""Llama-family checkpoints <-> this package's transformer: names, layouts, config, workdir.

A Llama-style model (RMSNorm, SwiGLU, RoPE, grouped-query attention, tied or untied embeddings)
is exactly `model.kind='transformer'` with `model.mixer='full'`, no qk-norm and no post-norms.
Weights are handled as plain float32 numpy arrays under Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, [out, in] as `torch.nn.Linear` stores them):
  embed_tokens [V, D] -> embed.embedding [V', D]  (rows padded to a multiple of 128 with zeros)
  q/k/v/o_proj, gate/up/down_proj -> mixer.wq/wk/wv/wo.kernel, mlp.w1/w3/w2 (transposed)
  input_layernorm, post_attention_layernorm, norm -> mixer_norm, mlp_norm, final_norm
  lm_head [V, D] -> head [D, V'] (absent when the embeddings are tied)
Hugging Face checkpoints rotate half-split pairs (i, i + d/2) as this package does, so Q and K
need no permutation here; GGUF files (interop/gguf.py) undo their interleaved layout first.

`write_workdir` turns such weights + a `LlamaSpec` + a tokenizer into a run directory (config,
Orbax checkpoint at step 0, tokenizer.json with the special tokens the model's files declare
beside it, import.json naming the source) that training, evaluation, generation and TLM open
like any run. Importing the same source with the same options into it again does nothing and
says so in one line (`already_imported`), before any conversion.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from ttt_jax.config import ConfigError, base_config, validate
from ttt_jax.data import special_tokens
from ttt_jax.data.saved_tokenizer import save_tokenizer
from ttt_jax.data.tokenizers import HFTokenizer, Tokenizer
from ttt_jax.models.lm import padded_vocab
from ttt_jax.runs.checkpoint import CKPT_DIR, RunCheckpoints
from ttt_jax.runs.workdir import TOKENIZER_DIR, WorkdirLock
from ttt_jax.train.trainer import Trainer

LAYER_NAMES = {  # HF name inside `model.layers.{i}.` -> (path in the block, transpose)
    "self_attn.q_proj.weight": (("mixer", "wq", "kernel"), True),
    "self_attn.k_proj.weight": (("mixer", "wk", "kernel"), True),
    "self_attn.v_proj.weight": (("mixer", "wv", "kernel"), True),
    "self_attn.o_proj.weight": (("mixer", "wo", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "w1"), True),
    "mlp.up_proj.weight": (("mlp", "w3"), True),
    "mlp.down_proj.weight": (("mlp", "w2"), True),
    "input_layernorm.weight": (("mixer_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters keep; recomputed here
IMPORT_RECORD = "import.json"


class ConvertError(ConfigError):
  """A checkpoint this converter cannot map; the message names the tensor, key or architecture."""


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
  """The hyper-parameters of a Llama-family model (names as in a HF `config.json`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 0  # the trained context; 0 when the files do not say
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  @classmethod
  def from_hf_config(cls, cfg: dict, where: str) -> LlamaSpec:
    arch = cfg.get("model_type", "?")
    if arch not in ("llama", "mistral") or cfg.get("architectures", ["LlamaForCausalLM"])[0] \
        not in ("LlamaForCausalLM", "MistralForCausalLM"):
      raise ConvertError(f"{where}: architecture {arch!r} ({cfg.get('architectures')}) not "
                         "supported; supported: llama (LlamaForCausalLM), mistral")
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                    ("sliding_window", None)):
      if cfg.get(key, ok) not in (ok,):
        raise ConvertError(f"{where}: {key}={cfg[key]!r} not supported (only {ok!r})")
    if cfg.get("hidden_act", "silu") != "silu":
      raise ConvertError(f"{where}: hidden_act={cfg['hidden_act']!r} not supported (only silu)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
      raise ConvertError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} != "
                         f"hidden_size={cfg['hidden_size']} not supported")
    eos = cfg.get("eos_token_id")
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               intermediate_size=cfg["intermediate_size"],
               num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
               num_key_value_heads=cfg.get("num_key_value_heads") or heads,
               rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
               rope_theta=float(cfg.get("rope_theta", 10000.0)),
               tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
               max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),  # HF default
               bos_token_id=cfg.get("bos_token_id"),
               eos_token_id=eos[0] if isinstance(eos, list) else eos)

  def to_hf_config(self) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_act": "silu", "torch_dtype": "float32", "attention_bias": False,
            "mlp_bias": False, "rope_scaling": None, "initializer_range": 0.02,
            "head_dim": self.hidden_size // self.num_attention_heads,
            **dataclasses.asdict(self)}


def model_config(spec: LlamaSpec, tokenizer: Tokenizer, seq_len: int) -> ml_collections.ConfigDict:
  """A full run config for `spec` (vocab from the tokenizer, which covers the checkpoint's)."""
  c = base_config()
  m = c.model
  m.kind, m.mixer, m.qk_norm, m.post_norm = "transformer", "full", False, False
  m.vocab_size = tokenizer.vocab_size
  m.num_layers, m.d_model = spec.num_hidden_layers, spec.hidden_size
  m.num_heads, m.num_kv_heads = spec.num_attention_heads, spec.num_key_value_heads
  m.intermediate_size = spec.intermediate_size
  m.rope_theta, m.norm_eps = spec.rope_theta, spec.rms_norm_eps
  m.trained_context = spec.max_position_embeddings
  m.tie_embeddings = spec.tie_word_embeddings
  m.window = min(m.window, seq_len)
  c.data.seq_len = seq_len
  c.eval.chunk = min(c.eval.chunk, seq_len)
  return c


def _vocab_rows(w: np.ndarray, vocab: int) -> np.ndarray:
  """[V, D] -> [padded_vocab(vocab), D]: rows beyond the tokenizer dropped, padding zero."""
  out = np.zeros((padded_vocab(vocab), w.shape[1]), np.float32)
  n = min(vocab, w.shape[0])
  out[:n] = w[:n]
  return out


def hf_to_params(tensors: dict[str, np.ndarray], spec: LlamaSpec, vocab: int,
                 where: str) -> dict:
  """HF-named weights -> this package's parameter dict (`nnx.State.to_pure_dict` layout)."""
  left = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}

  def take(name: str, shape: tuple) -> np.ndarray:
    if name not in left:
      raise ConvertError(f"{where}: tensor {name!r} missing")
    w = np.asarray(left.pop(name), np.float32)
    if w.shape != shape:
      raise ConvertError(f"{where}: tensor {name!r} has shape {w.shape}, expected {shape}")
    return w

  d, i_size = spec.hidden_size, spec.intermediate_size
  kv = spec.num_key_value_heads * (d // spec.num_attention_heads)
  shapes = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
            "mlp.gate_proj.weight": (i_size, d), "mlp.up_proj.weight": (i_size, d),
            "mlp.down_proj.weight": (d, i_size), "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,)}
  blocks = {}
  for layer in range(spec.num_hidden_layers):
    block: dict = {}
    for hf, (path, transpose) in LAYER_NAMES.items():
      w = take(f"model.layers.{layer}.{hf}", shapes[hf])
      node = block
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = w.T.copy() if transpose else w
    blocks[layer] = block
  emb = left.pop("model.embed_tokens.weight", None)
  if emb is None:
    raise ConvertError(f"{where}: tensor 'model.embed_tokens.weight' missing")
  params = {"blocks": blocks, "embed": {"embedding": _vocab_rows(np.asarray(emb, np.float32),
                                                                 vocab)},
            "final_norm": {"scale": take("model.norm.weight", (d,))}}
  head = left.pop("lm_head.weight", None)
  if not spec.tie_word_embeddings:
    if head is None:
      raise ConvertError(f"{where}: tensor 'lm_head.weight' missing (embeddings are not tied)")
    params["head"] = _vocab_rows(np.asarray(head, np.float32), vocab).T.copy()
  if left:
    raise ConvertError(f"{where}: unknown tensor {sorted(left)[0]!r} (and {len(left) - 1} more); "
                       "only Llama-family weights are supported")
  return params


def params_to_hf(params: dict, spec: LlamaSpec) -> dict[str, np.ndarray]:
  """The inverse of `hf_to_params` (embedding rows cut to `spec.vocab_size`)."""
  out = {}
  for layer, block in params["blocks"].items():
    for hf, (path, transpose) in LAYER_NAMES.items():
      w = block
      for key in path:
        w = w[key]
      w = np.asarray(w, np.float32)
      out[f"model.layers.{int(layer)}.{hf}"] = np.ascontiguousarray(w.T if transpose else w)
  v = spec.vocab_size
  out["model.embed_tokens.weight"] = np.asarray(params["embed"]["embedding"], np.float32)[:v]
  out["model.norm.weight"] = np.asarray(params["final_norm"]["scale"], np.float32)
  if not spec.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["head"], np.float32)[:, :v].T)
  return out


def import_request(source: str, **options) -> dict:
  """What an import reads: the source's files (size, modification time) and its options."""
  path = os.path.abspath(source)
  files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*")))
  stats = {os.path.basename(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files
           if os.path.isfile(f)}
  return {"source": path, "files": stats, "options": options}


def holds_checkpoints(out: str) -> bool:
  ckpt_dir = os.path.join(out, CKPT_DIR)
  return os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))


def _holds_checkpoints_error(out: str) -> ConfigError:
  return ConfigError(f"--out {out} already holds checkpoints; pass --overwrite to replace them")


def already_imported(out: str, request: dict, *, overwrite: bool, echo=print) -> bool:
  """True (after saying so in one line) when `out` already holds this very import; a
  ConfigError when it holds other checkpoints and `overwrite` is off. Both before converting."""
  if overwrite or not holds_checkpoints(out):
    return False
  try:
    with open(os.path.join(out, IMPORT_RECORD)) as f:
      same = json.load(f) == request
  except (OSError, ValueError):
    same = False
  if not same:
    raise _holds_checkpoints_error(out)
  if echo is not None:
    echo(f"{out} already holds this import of {request['source']}: nothing to do (--overwrite "
         "imports it again)")
  return True


def write_workdir(out: str, params: dict, spec: LlamaSpec, tokenizer: HFTokenizer | Tokenizer,
                  *, seq_len: int = 2048, data_source: str = "embedded",
                  val_fraction: float = 0.05, overwrite: bool = False, record: dict | None = None,
                  echo=print) -> ml_collections.ConfigDict:
  """A run directory at `out` holding `params` as the step-0 checkpoint. Returns its config.

  An `HFTokenizer` is saved as `out/tokenizer.json` (+ its declared special tokens as
  tokenizer_config.json / generation_config.json) and named by the config; other tokenizers
  (e.g. `bytes`) are named by their spec. `record` (`import_request`) is saved as import.json.
  The workdir's lock is held throughout, so a run training in `out` is never overwritten
  (`WorkdirBusy` names it).
  """
  with WorkdirLock(out, echo=echo or (lambda s: None)):
    return _write_workdir(out, params, spec, tokenizer, seq_len=seq_len,
                          data_source=data_source, val_fraction=val_fraction,
                          overwrite=overwrite, record=record, echo=echo)


def _write_workdir(out: str, params: dict, spec: LlamaSpec, tokenizer, *, seq_len: int,
                   data_source: str, val_fraction: float, overwrite: bool, record: dict | None,
                   echo) -> ml_collections.ConfigDict:
  ckpt_dir = os.path.join(out, CKPT_DIR)
  if holds_checkpoints(out):
    if not overwrite:
      raise _holds_checkpoints_error(out)
    shutil.rmtree(ckpt_dir)
  os.makedirs(out, exist_ok=True)
  record_path = os.path.join(out, IMPORT_RECORD)
  if os.path.isfile(record_path):
    os.remove(record_path)
  if isinstance(tokenizer, HFTokenizer):
    path = os.path.abspath(os.path.join(out, "tokenizer.json"))
    with open(path, "w", encoding="utf-8") as f:
      f.write(tokenizer.to_str())
    special_tokens.write_folder(out, tokenizer)
    spec_str = f"hf:{path}"
  else:
    spec_str = tokenizer.name
  config = model_config(spec, tokenizer, seq_len)
  config.data.tokenizer, config.data.source = spec_str, data_source
  config.data.val_fraction = val_fraction
  config.mesh.data = 1
  validate(config)
  trainer = Trainer.create(config)
  state = trainer.init_state()
  loaded = jax.tree.map(lambda a, w, s: jax.device_put(np.asarray(w, a.dtype), s),
                        trainer.abstract_params, params, trainer.state_shardings.params)
  state = state.replace(params=loaded)
  ck = RunCheckpoints(ckpt_dir, keep=1)
  try:
    ck.save(0, state, None, config, wait=True)
  finally:
    ck.close()
  # the run's copy of its tokenizer (runs/load.py): the run opens after `out` moved
  save_tokenizer(tokenizer, os.path.join(out, TOKENIZER_DIR))
  if record is not None:
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
  n = sum(int(np.prod(np.shape(w))) for w in jax.tree.leaves(params))
  if echo is not None:
    echo(f"wrote {out}: {spec.num_hidden_layers} layers, d_model {spec.hidden_size}, heads "
         f"{spec.num_attention_heads}/{spec.num_key_value_heads} kv, vocab {tokenizer.vocab_size}"
         f" (checkpoint {spec.vocab_size}), {n / 1e6:.1f}M parameters, tokenizer {spec_str}; "
         f"context {seq_len} (--seq_len), trained at "
         f"{spec.max_position_embeddings or 'a context the files do not state'}")
  return config
