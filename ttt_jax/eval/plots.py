"""PNG plots and text tables of evaluation results (matplotlib, Agg backend).

Input is one or more `results.json` dicts (see eval/perplexity.py:evaluate_run): perplexity vs
context length, loss vs position bucket (one line per run), and the "loss delta vs full
attention" table that compares methods at each context length; or `reading.json` dicts
(eval/reading.py:read_run): loss vs position over whole documents, with the reading slope.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ttt_jax.layers.mixers import MIXERS, mixer_spec


def run_label(res: dict) -> str:
  name = os.path.basename(os.path.normpath(res.get("workdir", ""))) or "run"
  return f"{name} ({res.get('kind', '?')})"


def _pyplot():
  # imported when a plot is drawn: the Agg backend must be chosen before pyplot loads
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_ppl_vs_ctx(runs: Sequence[dict], path: str) -> str:
  """Perplexity (log y) against context length (log2 x), one line per run."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for res in runs:
    xs = [c["ctx"] for c in res["contexts"]]
    line, = ax.plot(xs, [c["ppl"] for c in res["contexts"]], marker="o", label=run_label(res))
    if res.get("strided"):
      st = res["strided"]
      ax.plot([c["ctx"] for c in st["contexts"]], [c["ppl"] for c in st["contexts"]],
              marker="s", ls="--", color=line.get_color(),
              label=f"{run_label(res)}, strided {st['stride']}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("perplexity (validation)")
  ax.set_title("Perplexity vs context length")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_loss_vs_position(runs: Sequence[dict], path: str) -> str:
  """Mean NLL per log-spaced position bucket at each run's longest context."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for res in runs:
    buckets = res["position_buckets"]["buckets"]
    xs = [max(b["start"], 1) * 0.5 + b["end"] * 0.5 for b in buckets]  # bucket middle
    ax.plot(xs, [b["mean_nll"] for b in buckets], marker="o",
            label=f"{run_label(res)}, ctx {res['position_buckets']['ctx']}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in the sequence (bucket middle, tokens)")
  ax.set_ylabel("mean NLL (nats/token)")
  ax.set_title("Loss vs position")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_reading(runs: Sequence[dict], path: str) -> str:
  """Reading curves: mean NLL per position bucket (bucket's geometric middle, log2 x) over whole
  documents, one line per run, labelled with its reading slope."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for res in runs:
    buckets = res["buckets"]
    xs = [max(b["start"], 1) ** 0.5 * b["end"] ** 0.5 for b in buckets]
    slope = res.get("reading_slope")
    label = run_label(res) + ("" if slope is None else f", slope {slope:+.3f}")
    ax.plot(xs, [b["mean_nll"] for b in buckets], marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in the document (tokens)")
  ax.set_ylabel("mean NLL (nats/token)")
  sources = sorted({f"{r.get('source')} ({r.get('split')})" for r in runs})
  ax.set_title(f"Reading curve: {', '.join(sources)}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def reading_table(res: dict) -> str:
  """Per-bucket table of one run's reading curve, with its slope."""
  docs = f"{res['docs']} document{'s' * (res['docs'] != 1)}"
  lines = [f"{run_label(res)}: {docs} of {res['source']} ({res['split']}), "
           f"{res['tokens']:,} tokens, mean NLL {res['mean_nll']:.4f}",
           f"{'from':>9} {'to':>9} {'nll':>8} {'tokens':>12} {'docs':>5}"]
  for b in res["buckets"]:
    lines.append(f"{b['start']:>9,} {b['end']:>9,} {b['mean_nll']:>8.4f} {b['tokens']:>12,} "
                 f"{b['docs']:>5}")
  slope = res["reading_slope"]
  lines.append("reading slope: " + ("n/a (fewer than 3 buckets)" if slope is None else
                                    f"{slope:+.4f} nats per doubling of the position"))
  return "\n".join(lines)


def tokenizer_warning(runs: Sequence[dict]) -> str | None:
  """A warning when runs tokenize the text differently (their NLL per token is not comparable)."""
  names = sorted({r["tokenizer"] for r in runs if r.get("tokenizer")})
  if len(names) < 2:
    return None
  return (f"warning: the runs use different tokenizers ({', '.join(names)}): the same text gives "
          "different token counts, so NLL per token and positions are not like for like")


def _save(fig, path: str, tight: bool = True) -> str:
  """Saves and closes `fig` (laid out tight unless it has its own layout)."""
  plt = _pyplot()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if tight:
    fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_plots(runs: Sequence[dict], out_dir: str, prefix: str = "") -> list[str]:
  """`ppl_vs_ctx.png` and `loss_vs_position.png` (prefixed, e.g. 'compare_') in out_dir."""
  return [plot_ppl_vs_ctx(runs, os.path.join(out_dir, f"{prefix}ppl_vs_ctx.png")),
          plot_loss_vs_position(runs, os.path.join(out_dir, f"{prefix}loss_vs_position.png"))]


def ppl_table(res: dict) -> str:
  """Per-context-length table of one run, headed by the run and the documents it scored, with the
  strided perplexity beside it when the run has one (eval/strided.py)."""
  head = f"{run_label(res)}, step {res.get('step')}"
  if res.get("source") is not None:
    head += f", on {res['source']} ({res['split']})"
  st = res.get("strided") or {"contexts": []}
  by_ctx = {c["ctx"]: c for c in st["contexts"]}
  more = f" {'strided ppl':>12} {'nll':>8} {'tokens':>12}" if by_ctx else ""
  lines = [head, f"{'ctx':>8} {'ppl':>10} {'nll':>8} {'tokens':>12}{more}"]
  for c in res["contexts"]:
    s = by_ctx.get(c["ctx"])
    more = f" {s['ppl']:>12.3f} {s['mean_nll']:>8.4f} {s['tokens']:>12,}" if s else ""
    lines.append(f"{c['ctx']:>8} {c['ppl']:>10.3f} {c['mean_nll']:>8.4f} {c['tokens']:>12,}{more}")
  if by_ctx:
    lines.append(f"ppl: first ctx tokens of each document at context ctx; strided ppl: whole "
                 f"documents, windows of ctx advancing by {st['stride']}, each token once")
  return "\n".join(lines)


def baseline_index(runs: Sequence[dict]) -> int:
  """The full-attention run (a mixer whose state grows with the context, not E2E) if there is
  one, else the first run."""
  for i, res in enumerate(runs):
    mixer = res.get("mixer")
    if res.get("kind") != "e2e" and mixer in MIXERS and mixer_spec(mixer).state_grows:
      return i
  return 0


def compare_table(runs: Sequence[dict]) -> str:
  """Rows = runs, columns = context lengths: mean NLL minus the baseline's (negative = better)."""
  base = runs[baseline_index(runs)]
  base_nll = {c["ctx"]: c["mean_nll"] for c in base["contexts"]}
  ctxs = sorted(set().union(*({c["ctx"] for c in r["contexts"]} for r in runs)))
  width = max(len(run_label(r)) for r in runs) + 2
  head = f"loss delta vs {run_label(base)} (nats/token; negative = better)"
  lines = [head, f"{'run':<{width}}" + "".join(f"{x:>10}" for x in ctxs)]
  for res in runs:
    nll = {c["ctx"]: c["mean_nll"] for c in res["contexts"]}
    cells = [f"{nll[x] - base_nll[x]:>+10.4f}" if x in nll and x in base_nll else f"{'-':>10}"
             for x in ctxs]
    lines.append(f"{run_label(res):<{width}}" + "".join(cells))
  docs = {tuple(r.get("documents", ())) for r in runs}
  if len(docs) > 1:
    lines.append("warning: the runs were evaluated on different documents (data config or ctx "
                 "differ); deltas are not like for like")
  warning = tokenizer_warning(runs)
  return "\n".join(lines + ([warning] if warning else []))


# -- needle-in-a-haystack (eval/needle.py) -----------------------------------------------------
def _needle_cells(res: dict) -> dict:
  return {(c["ctx"], c["depth"]): c for c in res["cells"]}


def needle_table(res: dict) -> str:
  """Exact match / candidate accuracy per context length (rows) and needle depth (columns)."""
  task, cells = res["task"], _needle_cells(res)
  lines = [f"{run_label(res)}, step {res.get('step')}: exact match / candidate accuracy "
           f"(chance {task['chance']:.2f}), {task['needles']} needles per cell",
           f"{'ctx':>8}" + "".join(f"{f'{d:g}%':>13}" for d in task["depths"])]
  for ctx in task["ctxs"]:
    row = [cells[ctx, d] for d in task["depths"]]
    lines.append(f"{ctx:>8}" + "".join(
        f"{c['exact_match']:>6.2f} / {c['candidate_accuracy']:.2f}" for c in row))
  return "\n".join(lines)


def plot_needle_heatmap(res: dict, path: str) -> str:
  """Two heatmaps, context length (rows) x needle depth (columns): greedy exact match and
  candidate accuracy, each cell annotated with its value."""
  plt = _pyplot()
  task, cells = res["task"], _needle_cells(res)
  ctxs, depths = task["ctxs"], task["depths"]
  fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(depths), 2.2 + 0.55 * len(ctxs)),
                           layout="constrained")  # places the colorbar and the title too
  panels = (("exact_match", "exact match (greedy)"),
            ("candidate_accuracy", f"candidate accuracy (chance {task['chance']:.2f})"))
  for ax, (key, title) in zip(axes, panels, strict=True):
    grid = [[cells[c, d][key] for d in depths] for c in ctxs]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_yticks(range(len(ctxs)), [str(c) for c in ctxs])
    ax.set_xlabel("needle depth (haystack before the needle)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=list(axes), shrink=0.8)
  fig.suptitle(f"Needle retrieval: {run_label(res)}, {task['needles']} needles per cell",
               fontsize=10)
  return _save(fig, path, tight=False)
