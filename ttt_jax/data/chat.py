"""Chat prompts: messages rendered with a model's chat template.

Templates are Jinja text (HF tokenizer_config.json `chat_template`, GGUF `tokenizer.chat_template`).
Jinja is not a dependency: the ChatML family that SmolLM2 and Qwen use
(`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, `<|im_start|>assistant\\n` opening the
reply) is recognised and rendered here, with the default system message such a template inserts
when the conversation starts without one. Any other template fails in one line.
"""

from __future__ import annotations

import re

from ttt_jax.config import ConfigError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# the system turn a template writes when messages[0] is not a system message
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)
_CHECKS_SYSTEM = re.compile(r"""[!=]=\s*['"]system['"]""")
_JINJA = re.compile(r"""[{}]|['"]\s*\+|\+\s*['"]""")  # template code, not a literal message


def is_chatml(template: str) -> bool:
  return IM_START in template and IM_END in template and "content" in template


def default_system(template: str) -> str | None:
  """The system message a ChatML template adds to a conversation that has none, if any."""
  if not _CHECKS_SYSTEM.search(template):
    return None
  for m in _DEFAULT_SYSTEM.finditer(template):
    if not _JINJA.search(m.group(1)):
      return m.group(1).replace("\\n", "\n")
  return None


def apply_chat_template(template: str | None, messages: list[dict[str, str]], *,
                        add_generation_prompt: bool = True) -> str:
  """The text of `messages` ({"role", "content"} dicts) in the model's chat format, ending with
  the opening of the assistant's turn when `add_generation_prompt`."""
  if template is None:
    raise ConfigError("--chat: the model's files have no chat template (tokenizer_config.json "
                      "chat_template / GGUF tokenizer.chat_template)")
  if not is_chatml(template):
    raise ConfigError(f"--chat: chat template {template[:60]!r}... is not supported (only the "
                      f"ChatML family: {IM_START}role ... {IM_END})")
  parts = []
  system = default_system(template)
  if system is not None and messages and messages[0]["role"] != "system":
    parts.append(f"{IM_START}system\n{system}{IM_END}\n")
  parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n")
  return "".join(parts)
