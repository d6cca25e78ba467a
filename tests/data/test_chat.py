"""ChatML chat templates rendered without Jinja: SmolLM2's template (its default system turn,
a conversation with its own system message, the generation prompt), a Qwen-style template whose
first system literal is template code, and one-line errors for what is not supported."""

from __future__ import annotations

import numpy as np
import pytest

from ttt_jax.config import ConfigError
from ttt_jax.data.chat import apply_chat_template, default_system

SMOLLM2 = (  # tokenizer.chat_template of SmolLM2-135M-Instruct's GGUF file
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_LIKE = (  # the shape of Qwen2.5's: a system literal built from code first, the default later
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
    "Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def words(rng, n: int) -> str:
  return " ".join("".join(rng.choice(list("abcdefgh?!'"), rng.integers(1, 8))) for _ in range(n))


def test_smollm2_template_with_its_default_system_turn():
  rng = np.random.default_rng()
  q, a, q2 = words(rng, 5), words(rng, 7), words(rng, 3)
  messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
              {"role": "user", "content": q2}]
  want = (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
          f"<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n{q2}<|im_end|>\n")
  assert apply_chat_template(SMOLLM2, messages, add_generation_prompt=False) == want
  assert apply_chat_template(SMOLLM2, messages) == want + "<|im_start|>assistant\n"


def test_a_conversations_own_system_message_replaces_the_default():
  rng = np.random.default_rng()
  system, q = words(rng, 4), words(rng, 4)
  messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
  want = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
          "<|im_start|>assistant\n")
  assert apply_chat_template(SMOLLM2, messages) == want
  assert apply_chat_template(QWEN_LIKE, messages) == want


def test_default_system_is_a_literal_never_template_code():
  assert default_system(SMOLLM2) == SMOL_SYSTEM
  assert default_system(QWEN_LIKE) == "You are Qwen, a helpful assistant."
  plain = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + " \
          "'<|im_end|>\n'}}{% endfor %}"
  assert default_system(plain) is None
  assert apply_chat_template(plain, [{"role": "user", "content": "x"}]) == \
      "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_missing_or_unsupported_template_fails_in_one_line():
  with pytest.raises(ConfigError, match="no chat template"):
    apply_chat_template(None, [{"role": "user", "content": "x"}])
  llama3 = "{{ bos_token }}\n{% for m in messages %}<|start_header_id|>{{ m['role'] }}{% endfor %}"
  with pytest.raises(ConfigError, match="not supported") as e:
    apply_chat_template(llama3, [{"role": "user", "content": "x"}])
  assert "\n" not in str(e.value)
