"""TTT-E2E experiment grid: pretrain at 8K, then extend the context to 32K and 128K.

`configs/e2e.py:scale=125m,stage=pretrain` and so on; `get_config(arg)` takes a comma list of
  scale  tiny | 125m | 350m | 760m | 1b | 3b                         (default tiny)
  stage  pretrain | ext32k | ext128k                                 (default pretrain)
  model  e2e | swa | transformer  (E2E, or the SWA / full-attention baselines; default e2e)
  mode   meta | pretrain  (e2e only: TTT-E2E meta-learning or the plain LM objective)
  from   workdir of the run to extend (ext stages): sets checkpoint.load_part=params and
         checkpoint.load_from, so the new run starts from those parameters with a fresh
         optimizer, step 0 and a fresh data iterator.

Context lengths per stage: 8K / 32K / 128K at full scale; the tiny CPU versions use
512 / 2K / 8K (same 4x and 16x extension ratios; window 256, chunk 128).

Hyperparameters follow the public TTT-E2E training configs where they are published:
pretraining at 8K with 64 x 8K tokens per step for ~20 tokens per parameter (125M: 4,800 steps
at lr 3e-3; 350M: 13,500 at 1.5e-3; 1B: 50,000 at 1e-3), 10% linear warmup of both the outer
lr and the inner lr (ilr warmup from 0), cosine decay to 1e-5, AdamW (0.9, 0.95), weight decay
0.1, clip 1.0; the inner loop is SGD with lr 1 and gradient clip 1 on mini-batches of 1K tokens.
Extension runs take 2M tokens per step (32K x 64, 128K x 16) at lr 4e-4 for 1,250 steps with
the inner lr at full value from the start. The 760M learning rate and the 3B step count
(164B tokens, as in the paper) are our interpolations.

Example (tiny, on CPU):
  python scripts/train.py --config configs/e2e.py:scale=tiny --workdir runs/e2e-tiny
  python scripts/train.py --config configs/e2e.py:scale=tiny,stage=ext32k,from=runs/e2e-tiny \\
      --workdir runs/e2e-tiny-2k
"""

from ttt_jax.config import ConfigError, build_config

STAGES = ("pretrain", "ext32k", "ext128k")
KINDS = ("e2e", "swa", "transformer")
CTX = {"tiny": ("512", "2k", "8k")}
FULL_CTX = ("8k", "32k", "128k")
# scale: (pretrain steps, pretrain lr)
PRETRAIN = {"tiny": (300, 3e-3), "125m": (4800, 3e-3), "350m": (13500, 1.5e-3),
            "760m": (29000, 1.25e-3), "1b": (50000, 1e-3), "3b": (312500, 8e-4)}
EXT_TOKENS_PER_STEP = 1 << 21


def _parse(arg: str | None) -> dict[str, str]:
  out = {"scale": "tiny", "stage": "pretrain", "model": "e2e", "mode": "meta", "from": ""}
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    k, sep, v = item.partition("=")
    if not sep or k.strip() not in out:
      raise ConfigError(f"configs/e2e.py arg {item!r}: expected key=value with key in "
                        f"{', '.join(out)}")
    out[k.strip()] = v.strip()
  if out["stage"] not in STAGES:
    raise ConfigError(f"configs/e2e.py stage={out['stage']!r}; allowed: {', '.join(STAGES)}")
  if out["model"] not in KINDS:
    raise ConfigError(f"configs/e2e.py model={out['model']!r}; allowed: {', '.join(KINDS)}")
  return out


def get_config(arg: str | None = None):
  a = _parse(arg)
  scale, stage = a["scale"], STAGES.index(a["stage"])
  ctx = CTX.get(scale, FULL_CTX)[stage]
  c = build_config(f"model={a['model']},scale={scale},ctx={ctx},mode={a['mode']}")
  tr, e = c.train, c.model.e2e
  steps, lr = PRETRAIN[scale]
  tiny = scale == "tiny"
  if stage == 0:
    tr.steps, tr.lr = steps, lr
    if not tiny:
      c.data.batch_size = 64
  else:
    tr.steps, tr.lr = (100, 1e-3) if tiny else (1250, 4e-4)
    c.data.batch_size = 4 if tiny else max(1, EXT_TOKENS_PER_STEP // c.data.seq_len)
    e.ilr_init = e.inner_lr  # the inner lr is already warmed up in the pretrained model
  tr.warmup_steps = max(1, tr.steps // 10)
  tr.schedule = "cosine"
  tr.min_lr_ratio = 1e-5 / tr.lr
  e.ilr_warmup_steps = tr.warmup_steps if stage == 0 else 0
  if a["from"]:
    c.checkpoint.load_part, c.checkpoint.load_from = "params", a["from"]
  return c
