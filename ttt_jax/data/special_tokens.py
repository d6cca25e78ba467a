"""The special tokens a model's files declare: BOS, EOS (every id that ends a generation), PAD,
whether an encoding starts with BOS, and the chat template.

Hugging Face folders declare them in `tokenizer_config.json` (bos_token, eos_token, pad_token,
add_bos_token, chat_template), `generation_config.json` and `config.json` (bos/eos/pad_token_id,
EOS possibly a list); GGUF files in `tokenizer.ggml.*` metadata (interop/gguf.py reads it).
An import writes what it resolved beside the run's tokenizer.json as tokenizer_config.json +
generation_config.json (the Hugging Face files), so the run uses exactly what the model's file
said. A tokenizer file with none of these beside it keeps choosing its specials by name.
"""

from __future__ import annotations

import dataclasses
import json
import os

CONFIG_FILES = ("tokenizer_config.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class DeclaredSpecials:
  """What the files say; None / () where they say nothing."""

  bos: int | None = None
  eos: tuple[int, ...] = ()  # the first is the EOS; all of them end a generation
  pad: int | None = None
  add_bos: bool | None = None
  chat_template: str | None = None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
  """A config's token id field (an int, a list of ints or null) as a list."""
  if isinstance(value, bool) or value is None:
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


def _template(value) -> str | None:
  """`chat_template`: a string, or HF's list of named templates (the one named default)."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    return named.get("default")
  return None


def _post_processor_adds_bos(tk) -> bool:
  """Whether a `tokenizers` file's post-processor puts a special token first (as Llama's do)."""
  proc = json.loads(tk.to_str()).get("post_processor") or {}
  procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
  for p in procs:
    if p and p.get("type") == "TemplateProcessing":
      single = p.get("single") or []
      return bool(single) and "SpecialToken" in single[0]
  return False


def read_folder(folder: str, tk) -> DeclaredSpecials | None:
  """The specials declared by the HF config files in `folder` for the `tokenizers.Tokenizer`
  `tk` (ids outside its vocabulary are ignored); None when no file declares any."""
  tc = _read_json(os.path.join(folder, "tokenizer_config.json"))
  gc = _read_json(os.path.join(folder, "generation_config.json"))
  mc = _read_json(os.path.join(folder, "config.json"))
  size = tk.get_vocab_size(with_added_tokens=True)

  def token_id(value) -> list[int]:
    text = value.get("content") if isinstance(value, dict) else value
    i = tk.token_to_id(text) if isinstance(text, str) else None
    return [] if i is None else [int(i)]

  def declared(key: str) -> list[int]:
    found = token_id(tc.get(f"{key}_token")) + _ids(gc.get(f"{key}_token_id")) \
        + _ids(mc.get(f"{key}_token_id"))
    return list(dict.fromkeys(i for i in found if 0 <= i < size))

  bos, eos, pad = declared("bos"), declared("eos"), declared("pad")
  add_bos = tc.get("add_bos_token")
  if not isinstance(add_bos, bool):
    add_bos = _post_processor_adds_bos(tk) if tc else None
  template = _template(tc.get("chat_template"))
  if not (bos or eos or pad or add_bos is not None or template):
    return None
  return DeclaredSpecials(bos=bos[0] if bos else None, eos=tuple(eos),
                          pad=pad[0] if pad else None, add_bos=add_bos, chat_template=template)


def write_folder(folder: str, tokenizer) -> None:
  """Writes the resolved specials of an `HFTokenizer` as HF config files in `folder` (removes
  stale ones when the tokenizer chose its specials by name)."""
  if tokenizer.declared is None:
    for name in CONFIG_FILES:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        os.remove(path)
    return
  token = tokenizer.tk.id_to_token
  config = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
            "pad_token": token(tokenizer.pad_id), "add_bos_token": tokenizer.add_bos}
  if tokenizer.chat_template is not None:
    config["chat_template"] = tokenizer.chat_template
  generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                "pad_token_id": tokenizer.pad_id}
  for name, data in zip(CONFIG_FILES, (config, generation), strict=True):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, ensure_ascii=False)
