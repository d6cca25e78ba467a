"""An independent NumPy forward pass of the Llama equations on HF-named weights, and a random
tiny Llama checkpoint (2 layers, GQA 4:2, odd vocab) for the converter tests."""

from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e4)


def random_llama(seed: int = 0, tied: bool = False, **overrides) -> tuple[dict, dict]:
  """(HF config dict, HF-named float32 tensors) of a random Llama."""
  cfg = dict(TINY, tie_word_embeddings=tied, **overrides)
  rng = np.random.default_rng(seed)
  d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
  w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
  t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d)}
  for layer in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    t.update({p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
              p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
              p + "mlp.gate_proj.weight": w(i, d), p + "mlp.up_proj.weight": w(i, d),
              p + "mlp.down_proj.weight": w(d, i), p + "input_layernorm.weight": 1 + w(d),
              p + "post_attention_layernorm.weight": 1 + w(d)})
  if not tied:
    t["lm_head.weight"] = w(v, d)
  cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
  return cfg, t


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):
  """Half-split rotation (HF Llama): pairs (i, i + d/2). x [T, H, d]."""
  t, _, d = x.shape
  inv = theta ** (-np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def llama_logits(cfg: dict, t: dict, tokens) -> np.ndarray:
  """Logits [T, V] of one sequence, float64."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  eps, n_h, n_kv = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d = cfg["hidden_size"] // n_h
  h = t["model.embed_tokens.weight"][np.asarray(tokens)]
  n = h.shape[0]
  causal = np.tril(np.ones((n, n), bool))
  for layer in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    x = _rms(h, t[p + "input_layernorm.weight"], eps)
    q = _rope((x @ t[p + "self_attn.q_proj.weight"].T).reshape(n, n_h, d), cfg["rope_theta"])
    k = _rope((x @ t[p + "self_attn.k_proj.weight"].T).reshape(n, n_kv, d), cfg["rope_theta"])
    v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(n, n_kv, d)
    out = np.zeros((n, n_h, d))
    for head in range(n_h):
      kvh = head // (n_h // n_kv)
      s = np.where(causal, q[:, head] @ k[:, kvh].T / np.sqrt(d), -np.inf)
      pr = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kvh]
    h = h + out.reshape(n, -1) @ t[p + "self_attn.o_proj.weight"].T
    x = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
    g = x @ t[p + "mlp.gate_proj.weight"].T
    h = h + ((g / (1 + np.exp(-g))) * (x @ t[p + "mlp.up_proj.weight"].T)) \
        @ t[p + "mlp.down_proj.weight"].T
  h = _rms(h, t["model.norm.weight"], eps)
  head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
  return h @ head.T
