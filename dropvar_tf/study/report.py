"""Fidelity tables and plots of a one-pass estimate against MC-dropout DPV."""

import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from dropvar_tf import metrics

TABLE_COLUMNS = ("spearman", "pearson", "r2", "r2_log", "auc_top10",
                 "auc_bottom10")


def fidelity_table(rows, columns=TABLE_COLUMNS):
  """Formats fidelity results as a markdown table.

  Args:
    rows: list of (name, fidelity dict) pairs, in display order.
    columns: metric keys to show.

  Returns:
    The table as a string.
  """
  lines = ["| estimator | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name, scores in rows:
    cells = []
    for c in columns:
      v = scores.get(c)
      cells.append("n/a" if v is None or np.isnan(v) else f"{v:.3f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def scatter_plot(estimate, target, path, title="one-pass estimate vs MC DPV"):
  """Saves a log-log scatter of estimate against MC target as PNG.

  Returns:
    `path`.
  """
  e = np.asarray(estimate, "float64").ravel()
  t = np.asarray(target, "float64").ravel()
  f = metrics.fidelity(e, t)
  fig, ax = plt.subplots(figsize=(5, 5))
  lo = max(min(e[e > 0].min(initial=1.0), t[t > 0].min(initial=1.0)), 1e-6)
  hi = max(e.max(), t.max())
  ax.loglog(np.maximum(t, lo), np.maximum(e, lo), ".", ms=3, alpha=0.5)
  ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
  ax.set_xlabel("MC-dropout DPV")
  ax.set_ylabel("one-pass estimate")
  ax.set_title(f"{title}\nSpearman {f['spearman']:.3f}, R² {f['r2']:.3f}")
  ax.legend(loc="upper left")
  return _save(fig, path)


def decile_plot(estimates, target, path, bins=10,
                title="mean MC DPV by decile of the estimate"):
  """Saves a decile plot: mean MC DPV per decile of each estimator, as PNG.

  Args:
    estimates: dict name -> (N,) estimate.
    target: (N,) MC DPV.
    path: PNG path.
    bins: number of quantile bins.

  Returns:
    `path`.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, est in estimates.items():
    table = metrics.decile_table(est, target, bins=bins)
    ax.plot(np.arange(1, bins + 1), table["target_mean"], "o-", label=name)
  ax.set_xlabel("decile of the estimate (1 = lowest)")
  ax.set_ylabel("mean MC-dropout DPV")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)
