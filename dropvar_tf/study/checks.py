"""The issue's goals, checked against a study's result rows.

`target_checks` turns the rows of one dropout rate into pass / MISS checks:
the recommended head's Spearman and R² against each task's goal, the
attainable bound set by MC noise, the gap between all layers and the best
single layer, and the margin over the baselines.
"""

import numpy as np

from dropvar_tf.study import estimators
from dropvar_tf.study import rows as rows_lib
from dropvar_tf.study.config import CRITEO
from dropvar_tf.study.config import DIGITS
from dropvar_tf.study.config import MNIST
from dropvar_tf.study.config import MOVIELENS
from dropvar_tf.study.config import TARGET_RATE

# Targets the issue sets at dropout rate 0.3 (Spearman, R2) per task.
TARGETS = {MOVIELENS: (0.95, 0.90), CRITEO: (0.95, 0.90),
           DIGITS: (0.93, 0.75), MNIST: (0.93, 0.75)}
SINGLE_LAYER_GAP = 0.02


def target_checks(rows, rate=TARGET_RATE, against="mc"):
  """Checks the issue's targets at `rate`; one dict per check.

  Args:
    rows: result rows.
    rate: the dropout rate the targets are set at.
    against: "mc" scores against the T-pass test targets (the metrics
      "spearman", "r2"), "ref" against the high-T reference ("ref_spearman",
      "ref_r2").

  Returns:
    A list of dicts: task, check (text), against, value (measured), goal,
    passed (bool, or None when a needed row is missing or not applicable).
  """
  pre = "" if against == "mc" else "ref_"
  spearman, r2 = pre + "spearman", pre + "r2"
  checks = []

  def check(task, text, value, goal, passed):
    checks.append({"task": task, "check": text, "against": against,
                   "value": value, "goal": goal, "passed": passed})

  for task in rows_lib.tasks_in(rows):
    rec = rows_lib.find_row(rows, task, rate, estimators.RECOMMENDED)
    if rec is None or spearman not in rec:
      continue
    s_goal, r2_goal = TARGETS[task]
    check(task, "recommended head Spearman", rec[spearman], f">= {s_goal}",
          rec[spearman] >= s_goal)
    check(task, "recommended head R2", rec[r2], f">= {r2_goal}",
          rec[r2] >= r2_goal)
    ceiling = rows_lib.find_row(rows, task, rate, estimators.NOISE_CEILING)
    if against == "mc" and ceiling and ceiling.get("spearman", 0) > 0:
      # Scored against one noisy T-pass run t = s + e, even the true DPV s
      # reaches only corr(s, t) = sqrt(corr(t, t')) and R2 = corr(t, t'),
      # where t' is a second run (the noise ceiling row).
      check(task, "bound for any estimator at this T: sqrt(ceiling "
            "Spearman) / ceiling Pearson as R2",
            (float(np.sqrt(ceiling["spearman"])), ceiling["pearson"]),
            "(bound, not a goal)", None)
    all_layers = rows_lib.find_row(rows, task, rate, estimators.ALL_LAYERS)
    singles = [r for r in rows if r["task"] == task and r["rate"] == rate and
               r["group"] == estimators.HEAD and r.get("layers") and
               len(r["layers"]) == 1 and r["features"] == "neurons" and
               not r["include_prediction"] and "duplicate_of" not in r]
    if all_layers and singles:
      best = max(singles, key=lambda r: r[spearman])
      gap = all_layers[spearman] - best[spearman]
      check(task, f"all layers minus best single layer ({best['layers'][0]}),"
            " Spearman", gap, f"<= {SINGLE_LAYER_GAP}",
            gap <= SINGLE_LAYER_GAP)
    for name in (estimators.PREDICTION_HEAD, estimators.MOMENT_PROPAGATION):
      base = rows_lib.find_row(rows, task, rate, name)
      if base is None or spearman not in base:
        check(task, f"recommended above {name}", None,
              "n/a (baseline not applicable)", None)
        continue
      check(task, f"recommended above {name} (Spearman / R2 margin)",
            (rec[spearman] - base[spearman], rec[r2] - base[r2]), "> 0 both",
            bool(rec[spearman] > base[spearman] and rec[r2] > base[r2]))
  return checks
