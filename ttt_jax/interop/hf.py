"""Hugging Face Llama checkpoints (config.json + safetensors + tokenizer.json) in and out.

  import_hf(DIR, OUT)     a HF model folder -> a run directory (interop/llama.py)
  export_hf(WORKDIR, DIR) a trained transformer run -> model.safetensors + config.json
                          (+ tokenizer.json when the run uses a `tokenizers` file, with
                          tokenizer_config.json / generation_config.json when its special
                          tokens were declared by the files it was imported from)
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import safetensors.numpy

from ttt_jax.data import special_tokens
from ttt_jax.data.tokenizers import HFTokenizer, get_tokenizer
from ttt_jax.interop.llama import (
    ConvertError,
    LlamaSpec,
    already_imported,
    hf_to_params,
    import_request,
    params_to_hf,
    write_workdir,
)
from ttt_jax.runs.load import load_run


def weight_files(folder: str) -> list[str]:
  """The checkpoint's safetensors files: the shards that model.safetensors.index.json maps
  weights to, else model.safetensors, else every *.safetensors but `consolidated*` (the copy of
  the weights under their original names that some repositories ship beside the shards)."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      if not all(isinstance(n, str) for n in names):
        raise TypeError("weight_map values must be file names")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); the "
                         "model folder is damaged, download it again") from None
    files = [os.path.join(folder, n) for n in names]
    if missing := [n for n, path in zip(names, files, strict=True) if not os.path.isfile(path)]:
      raise ConvertError(f"{index} names {len(missing)} missing file(s), e.g. {missing[0]}; "
                         "download the whole model folder")
    return files
  if os.path.isfile(single := os.path.join(folder, "model.safetensors")):
    return [single]
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  return [f for f in files if not os.path.basename(f).startswith("consolidated")] or files


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint's safetensors files (`weight_files`), as numpy."""
  files = weight_files(folder)
  if not files:
    raise ConvertError(f"hf:{folder}: no *.safetensors file")
  out: dict[str, np.ndarray] = {}
  for path in files:
    try:
      out.update(safetensors.numpy.load_file(path))
    except Exception as e:  # noqa: BLE001  (bf16 tensors: numpy has no bfloat16)
      out.update(_load_with_bf16(path, e))
  return out


def _load_with_bf16(path: str, err: Exception) -> dict[str, np.ndarray]:
  """Reads a safetensors file holding bfloat16 tensors (widened to float32); a truncated or
  damaged file is one ConvertError naming it."""
  try:
    return _read_widened(path, err)
  except (ValueError, KeyError, TypeError, OverflowError, MemoryError) as e:
    raise ConvertError(f"{path}: not a readable safetensors file, truncated or damaged "
                       f"({type(e).__name__}: {e}); download it again") from None


def _read_widened(path: str, err: Exception) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= size - 8:
      raise ValueError(f"header of {n} bytes in a file of {size}")
    header = json.loads(f.read(n))
    data = f.read()
  dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in dtypes:
      raise ConvertError(f"{path}: tensor {name!r} has dtype {meta['dtype']} ({err})")
    lo, hi = meta["data_offsets"]
    if hi > len(data):
      raise ValueError(f"tensor {name!r} ends at byte {hi} of {len(data)}")
    a = np.frombuffer(data[lo:hi], dtypes[meta["dtype"]]).reshape(meta["shape"])
    if meta["dtype"] == "BF16":
      a = (a.astype(np.uint32) << 16).view(np.float32)
    out[name] = a.astype(np.float32)
  return out


def load_hf(folder: str) -> tuple[LlamaSpec, dict[str, np.ndarray]]:
  where = f"hf:{folder}"
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"{where}: no config.json")
  try:
    with open(path) as f:
      config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConvertError(f"{path}: not valid JSON ({e}); the model folder is damaged, download "
                       "it again") from None
  if not isinstance(config, dict):
    raise ConvertError(f"{path}: expected a JSON object, got {type(config).__name__}")
  spec = LlamaSpec.from_hf_config(config, where)
  return spec, read_safetensors(folder)


def import_hf(folder: str, out: str, *, tokenizer: str | None = None, seq_len: int = 2048,
              data_source: str = "embedded", val_fraction: float = 0.05,
              overwrite: bool = False, echo=print):
  """A HF Llama folder -> a run directory. `tokenizer`: a `data.tokenizer` spec to use instead
  of the folder's tokenizer.json (whose special tokens come from the folder's
  tokenizer_config.json, generation_config.json and config.json). Returns the run's config, or
  None when `out` already holds this import (nothing is converted again)."""
  if not os.path.isdir(folder):
    raise ConvertError(f"hf:{folder}: no such folder")
  record = import_request(folder, tokenizer=tokenizer, seq_len=seq_len, data_source=data_source,
                          val_fraction=val_fraction)
  if already_imported(out, record, overwrite=overwrite, echo=echo):
    return None
  spec, tensors = load_hf(folder)
  if tokenizer is None:
    tk_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tk_path):
      raise ConvertError(f"hf:{folder}: no tokenizer.json; pass --tokenizer SPEC")
    tok = HFTokenizer.from_path(tk_path)
  else:
    tok = get_tokenizer(tokenizer)
  if tok.vocab_size < spec.vocab_size and echo is not None:
    echo(f"note: the tokenizer has {tok.vocab_size} ids, the checkpoint {spec.vocab_size} "
         "embedding rows: the rows no token reaches are dropped")
  params = hf_to_params(tensors, spec, tok.vocab_size, f"hf:{folder}")
  return write_workdir(out, params, spec, tok, seq_len=seq_len, data_source=data_source,
                       val_fraction=val_fraction, overwrite=overwrite, record=record, echo=echo)


def jax_to_numpy(tree):
  if isinstance(tree, dict):
    return {k: jax_to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def spec_of(config) -> LlamaSpec:
  """The Llama hyper-parameters of a run config (ConvertError if it is not Llama-shaped)."""
  m = config.model
  for key, want in (("kind", "transformer"), ("mixer", "full"), ("qk_norm", False),
                    ("post_norm", False), ("scan_layers", False)):
    if m[key] != want:
      raise ConvertError(f"model.{key}={m[key]!r}: only model.{key}={want!r} runs export to the "
                         "Llama layout")
  return LlamaSpec(vocab_size=m.vocab_size, hidden_size=m.d_model,
                   intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                   num_attention_heads=m.num_heads,
                   num_key_value_heads=m.num_kv_heads or m.num_heads, rms_norm_eps=m.norm_eps,
                   rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                   max_position_embeddings=m.trained_context or config.data.seq_len)


def export_hf(workdir: str, out: str, *, step: int | None = None, echo=print) -> str:
  """Writes `out/model.safetensors` + `out/config.json` (+ tokenizer.json). Returns `out`."""
  if os.path.exists(out) and not os.path.isdir(out):  # before the run is read
    raise ConvertError(f"--out {out}: a file is there, not a folder; choose a folder")
  run = load_run(workdir, step)
  config, params, tok = run.config, jax_to_numpy(run.params), run.data.tokenizer
  spec = spec_of(config)
  spec = LlamaSpec(**{**spec.__dict__, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
  os.makedirs(out, exist_ok=True)
  safetensors.numpy.save_file(params_to_hf(params, spec), os.path.join(out, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(spec.to_hf_config(), f, indent=2)
  if isinstance(tok, HFTokenizer):
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tok.to_str())
    special_tokens.write_folder(out, tok)
  if echo is not None:
    echo(f"wrote {out}: model.safetensors, config.json"
         f"{', tokenizer.json' if isinstance(tok, HFTokenizer) else ''} (tokenizer {tok.name})")
  return out
