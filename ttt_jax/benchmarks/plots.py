"""PNG figures of one machine's benchmark results (matplotlib, Agg backend)."""

from __future__ import annotations

import os

from ttt_jax.benchmarks.common import fmt_len, stream_memory_of


def _plt():
  # imported when a figure is drawn: the Agg backend must be chosen before pyplot loads
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _footer(fig, entry: dict) -> None:
  m = entry["machine"]
  text = (f"{entry['config']}\n{m['cpu']}, {m['cores']} cores, device {m['device_kind']}; "
          f"jax {m['jax']}; {m['date']}")
  fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom", ha="left", color="0.3", wrap=True)


def _save(fig, out_dir: str, name: str) -> str:
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  return name


def _ok(r: dict) -> bool:
  return "skipped" not in r and "error" not in r


def machine_figures(key: str, entry: dict, out_dir: str) -> dict[str, str]:
  """Writes benchmarks_<key>_<what>.png; returns {what: file name} for the markdown."""
  plt = _plt()
  sec, figs = entry["sections"], {}
  tag = key.replace("/", "_")
  train = sec.get("train")
  if train and any(_ok(r) and "tokens_per_s" in r for r in train["kinds"].values()):
    kinds = [k for k, r in train["kinds"].items() if _ok(r) and "tokens_per_s" in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    ax[0].bar(kinds, [train["kinds"][k]["tokens_per_s"] for k in kinds], color="tab:blue")
    ax[0].set_ylabel("training tokens/s")
    mfu = [100 * train["kinds"][k].get("mfu", 0.0) for k in kinds]
    ax[1].bar(kinds, mfu, color="tab:green")
    ax[1].set_ylabel("MFU (% of measured matmul peak)")
    for a in ax:
      a.tick_params(axis="x", rotation=35, labelsize=8)
    fig.suptitle("Train step throughput", fontsize=10)
    _footer(fig, entry)
    figs["train"] = _save(fig, out_dir, f"benchmarks_{tag}_train.png")
    plt.close(fig)
  stream = sec.get("streaming")
  if stream:
    lengths = stream["lengths"]
    for phase in ("prefill", "decode"):
      if phase not in entry.get("phases", ()):
        continue
      fig, ax = plt.subplots(figsize=(6.4, 4.2))
      drew = False
      for kind, r in stream["kinds"].items():
        pts = [(n, r[str(n)][phase]["per_token_s"] * 1e6) for n in lengths
               if _ok(r) and "per_token_s" in r.get(str(n), {}).get(phase, {})]
        if pts:
          ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
          drew = True
      if not drew:
        plt.close(fig)
        continue
      ax.set_xscale("log", base=2)
      ax.set_xticks(lengths, [fmt_len(n) for n in lengths])
      ax.set_xlabel("context length (tokens)")
      ax.set_ylabel("µs per token")
      ax.set_title(f"{phase.capitalize()} latency per token vs context length", fontsize=10)
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
      _footer(fig, entry)
      figs[phase] = _save(fig, out_dir, f"benchmarks_{tag}_{phase}.png")
      plt.close(fig)
  mem = stream_memory_of(sec)
  if mem and any(_ok(r) and r for r in mem.values()):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, r in mem.items():
      if not _ok(r) or not r:
        continue
      ns = sorted(int(n) for n in r)
      ax.plot(ns, [r[str(n)]["peak_bytes"] / 2**20 for n in ns], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("peak MiB of one streaming chunk step")
    ax.set_title("Streaming evaluation memory vs context length", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _footer(fig, entry)
    figs["memory"] = _save(fig, out_dir, f"benchmarks_{tag}_memory.png")
    plt.close(fig)
  return figs
