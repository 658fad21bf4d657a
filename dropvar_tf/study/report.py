"""Fidelity tables, plots and the study's report (results.md, results.json).

`fidelity_table`, `scatter_plot` and `decile_plot` show one estimate against
MC-dropout DPV (the `dropvar` demo uses them); `write_report` writes a whole
study's results (`runner.run_study`) as markdown, JSON and PNG plots. This is
the one module of the study that imports matplotlib; it selects the Agg
backend (no display) before pyplot is imported.
"""

import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dropvar_tf import metrics
from dropvar_tf.study import estimators
from dropvar_tf.study import rows as rows_lib
from dropvar_tf.study.config import CRITEO
from dropvar_tf.study.config import DIGITS
from dropvar_tf.study.config import MNIST
from dropvar_tf.study.config import MOVIELENS
from dropvar_tf.study.config import TARGET_RATE

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


def _save(fig, path, dpi=110):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


# ---------------------------------------------------------------------------
# The study's report.

_TASK_TITLES = {MOVIELENS: "MovieLens-100k (rating regression)",
                CRITEO: "Criteo-like (click-through, binary)",
                DIGITS: "digits (10 classes)",
                MNIST: "MNIST-5k (10 classes)"}


def _fmt(value, digits=3):
  if value is None:
    return "n/a"
  if isinstance(value, (tuple, list)):
    return " / ".join(_fmt(v, digits) for v in value)
  if isinstance(value, float) and not np.isfinite(value):
    return "n/a"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return f"{value:,}"
  return f"{value:.{digits}f}"


def _table(header, lines):
  out = ["| " + " | ".join(header) + " |",
         "|" + "|".join("---" if i < 2 else "---:"
                        for i in range(len(header))) + "|"]
  out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
  return "\n".join(out)


def fidelity_rows_table(rows, reference_samples=None):
  """Markdown table of result rows: one line per estimator.

  Args:
    rows: result rows (`dropvar_tf.study.rows`).
    reference_samples: T of the reference run, or None: with it, two more
      columns score against the reference.

  Returns:
    The table as a string.
  """
  columns = list(TABLE_COLUMNS)
  header = ["estimator", "data", "rate", *TABLE_COLUMNS]
  if reference_samples:
    columns += ["ref_spearman", "ref_r2"]
    header += [f"spearman (T={reference_samples})",
               f"r2 (T={reference_samples})"]
  header += ["head params", "µs/example"]
  lines = []
  for r in rows:
    if "unsupported" in r:
      cells = ["n/a"] * len(columns)
      cells[0] = "unsupported: " + r["unsupported"]
    else:
      cells = [_fmt(r.get(c)) for c in columns]
    lines.append([r["estimator"], r["data"], r["rate"], *cells,
                  _fmt(r["head_params"]), _fmt(r["us_per_example"], 1)])
  return _table(header, lines)


def checks_table(checks):
  """Markdown table of `checks.target_checks`."""
  lines = [[c["task"], c["check"], c["against"], _fmt(c["value"]), c["goal"],
            {True: "pass", False: "MISS", None: "n/a"}[c["passed"]]]
           for c in checks]
  return _table(["task", "check (test split)", "scored against", "measured",
                 "goal", "result"], lines)


def context_table(infos):
  """Markdown table of the per-configuration context."""
  lines = []
  for i in infos:
    name, value = i["quality"]
    lines.append([i["task"], i.get("data_full", i["data"]), i["rate"],
                  f"{name} {value:.3f}", _fmt(i["mc_dpv_mean_fit"], 4),
                  _fmt(i["mc_dpv_mean_test"], 4),
                  _fmt(i["base_us_per_example"], 1),
                  _fmt(i["mc_us_per_example"], 1),
                  _fmt(i.get("seconds"), 0)])
  mc_header = (f"MC µs/example (T={infos[0]['num_samples']})" if infos
               else "MC µs/example")
  return _table(["task", "data", "rate", "base model (test)",
                 "mean MC DPV, calibration", "mean MC DPV, test",
                 "base µs/example", mc_header, "run s"], lines)


def _plot_scatters(results, output_dir, rate):
  paths = {}
  for info in results["configs"]:
    if info["rate"] != rate or "test_targets" not in info:
      continue
    rec = rows_lib.find_row(results["rows"], info["task"], rate,
                            estimators.RECOMMENDED)
    if rec is None or "estimate" not in rec:
      continue
    paths[info["task"]] = scatter_plot(
        rec["estimate"], info["test_targets"],
        os.path.join(output_dir, f"scatter_{info['task']}.png"),
        title=f"{info['task']}, dropout {rate}: default head vs MC DPV")
  return paths


def _plot_layers(results, path, rate):
  tasks = rows_lib.tasks_in(results["rows"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 5),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in results["rows"] if r["task"] == task and
            r["rate"] == rate and "spearman" in r and
            r["group"] != estimators.CEILING and "duplicate_of" not in r]
    names = [r["estimator"].replace("baseline: ", "base: ")
             .replace("head: ", "") for r in rows]
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["spearman"] for r in rows], 0.4, label="Spearman")
    ax.barh(y + 0.2, [max(r["r2"], -0.2) for r in rows], 0.4,
            label="R² (clipped at -0.2)")
    ceiling = rows_lib.find_row(results["rows"], task, rate,
                                estimators.NOISE_CEILING)
    if ceiling:
      ax.axvline(ceiling["spearman"], color="k", ls="--", lw=1,
                 label="noise ceiling Spearman")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-0.2, 1.0)
    ax.set_title(f"{task}, dropout {rate}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
  fig.suptitle("fidelity vs MC DPV by feature set (test split)")
  return _save_study_plot(fig, path)


def _plot_rates(results, path):
  tasks = rows_lib.tasks_in(results["rows"])
  fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 7),
                           squeeze=False)
  shown = (estimators.RECOMMENDED, estimators.PREDICTION_HEAD,
           estimators.MOMENT_PROPAGATION, estimators.INPUT_ONLY,
           estimators.NOISE_CEILING)
  for col, task in enumerate(tasks):
    rates = rows_lib.rates_in(results["rows"], task)
    for name in shown:
      found = [rows_lib.find_row(results["rows"], task, r, name)
               for r in rates]
      if any(f is None or "spearman" not in f for f in found):
        continue
      for row, metric in enumerate(("spearman", "r2")):
        axes[row][col].plot(rates, [f[metric] for f in found], marker="o",
                            label=name.replace("baseline: ", ""),
                            ls="--" if name == estimators.NOISE_CEILING
                            else "-")
    for row, metric in enumerate(("Spearman", "R²")):
      ax = axes[row][col]
      ax.set_xlabel("dropout rate")
      ax.set_ylabel(metric)
      ax.set_title(task, fontsize=9)
      ax.set_ylim(-0.2 if row else 0.0, 1.0)
  axes[0][0].legend(fontsize=7, loc="lower left")
  fig.suptitle("fidelity vs MC DPV by dropout rate (test split)")
  return _save_study_plot(fig, path)


def _plot_cost(results, path, rate):
  tasks = rows_lib.tasks_in(results["rows"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in results["rows"] if r["task"] == task and
            r["rate"] == rate and r.get("us_per_example") and
            "spearman" in r and "duplicate_of" not in r]
    for r in rows:
      marker = {estimators.HEAD: "o", estimators.BASELINE: "s",
                estimators.CEILING: "*"}[r["group"]]
      label = r["estimator"].replace("head: ", "").replace("baseline: ", "")
      if r["group"] == estimators.CEILING:
        label = f"MC dropout, T={results['config']['num_samples']}"
      ax.semilogx(r["us_per_example"], r["spearman"], marker, ms=8,
                  label=label)
    # Narrow log ranges get crowded minor labels; major ticks suffice.
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(y=0.12)
    ax.set_xlabel("µs per example (log)")
    ax.set_ylabel("Spearman vs MC DPV")
    ax.set_title(f"{task}, dropout {rate}", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
  fig.suptitle("cost / fidelity trade-off (one CPU inference call; "
               "MC = the T-pass targets)")
  return _save_study_plot(fig, path)


def _save_study_plot(fig, path):
  fig.tight_layout()
  return _save(fig, path, dpi=100)


def _public(results):
  """`results` without per-example arrays (for results.json)."""
  rows = [{k: v for k, v in r.items() if k != "estimate"}
          for r in results["rows"]]
  infos = [{k: v for k, v in i.items() if k != "test_targets"}
           for i in results["configs"]]
  return dict(results, rows=rows, configs=infos)


def write_report(results, output_dir, command=None):
  """Writes results.md, results.json and the PNG plots to `output_dir`.

  Args:
    results: the dict `runner.run_study` builds (rows, configs, checks,
      config).
    output_dir: destination folder (created).
    command: the command line to print in the report (None: the default
      study command).

  Returns:
    dict name -> path of every file written.
  """
  os.makedirs(output_dir, exist_ok=True)
  config = results["config"]
  rows = results["rows"]
  rate = TARGET_RATE if TARGET_RATE in config["dropout_rates"] else (
      config["dropout_rates"][0])
  paths = {"scatter": _plot_scatters(results, output_dir, rate)}
  paths["layers"] = _plot_layers(
      results, os.path.join(output_dir, "fidelity_by_layers.png"), rate)
  paths["rates"] = _plot_rates(
      results, os.path.join(output_dir, "fidelity_by_rate.png"))
  paths["cost"] = _plot_cost(
      results, os.path.join(output_dir, "cost_fidelity.png"), rate)

  if command is None:
    command = ("python -m dropvar_tf.study.cli --output_dir=docs" +
               (" --small" if config["label"] == "small" else ""))
  lines = [
      "# dropvar_tf study: one-pass DPV estimates against MC dropout",
      "",
      f"Generated by `{command}` ({config['label']} mode) on a shared 2-core "
      "CPU machine; the configurations took "
      f"{sum(i.get('seconds', 0.0) for i in results['configs']) / 60:.1f} "
      "min of compute (stages reused from the cache count as 0). See "
      "`docs/study.md` for how to run and read it.",
      "",
      f"Settings: T = {config['num_samples']} MC passes per target; heads "
      f"fitted on {config['num_perturbed']} perturbed training inputs "
      f"(noise {config['perturb_noise']}, swap {config['perturb_swap']}, "
      "as `train_variation_head` does) labelled with MC DPV; max "
      f"{config['head_epochs']} head epochs, batch {config['head_batch_size']}"
      f"; seed {config['seed']}. Every number is on the test split against "
      "its own MC DPV (seed + 1); the noise ceiling is a second MC run "
      "(seed + 2) scored the same way. " + (
          f"The T={config['reference_samples']} columns score the same "
          "estimates against a less noisy reference MC run (seed + 3); there "
          f"the noise-ceiling row shows how well a {config['num_samples']}-"
          "pass MC run itself estimates DPV. " if config["reference_samples"]
          else "") + "DPV statistic: std of the output "
      "(regression), of the click probability (binary), of the predicted "
      "class's probability (classes).",
      "",
      f"## Targets (dropout rate {rate})",
      "",
      checks_table(results["checks"]),
      "",
      "## Base models and MC targets",
      "",
      context_table(results["configs"]),
      "",
  ]
  for task in rows_lib.tasks_in(rows):
    lines += [f"## {_TASK_TITLES[task]}", ""]
    for r in rows_lib.rates_in(rows, task):
      part = [x for x in rows if x["task"] == task and x["rate"] == r]
      layers = next((i["layers"] for i in results["configs"]
                     if i["task"] == task and i["rate"] == r), [])
      lines += [f"Dropout rate {r}; tapped candidate layers: "
                f"{', '.join(layers)}.", "",
                fidelity_rows_table(part, config["reference_samples"]), ""]
    if task in paths["scatter"]:
      scatter = os.path.basename(paths["scatter"][task])
      lines += [f"![scatter {task}]({scatter})", ""]
  lines += [
      "## Plots", "",
      f"![fidelity by layer subset]({os.path.basename(paths['layers'])})", "",
      f"![fidelity by dropout rate]({os.path.basename(paths['rates'])})", "",
      f"![cost and fidelity]({os.path.basename(paths['cost'])})", "",
  ]
  paths["report"] = os.path.join(output_dir, "results.md")
  with open(paths["report"], "w") as f:
    f.write("\n".join(lines))
  paths["json"] = os.path.join(output_dir, "results.json")
  with open(paths["json"], "w") as f:
    json.dump(_public(dict(results, paths=None)), f, indent=1, default=float)
  return paths
