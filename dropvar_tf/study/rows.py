"""Result rows: one estimator's scores on one (task, dropout rate).

A row is a plain dict (it goes to JSON as is): "task", "data", "rate",
"estimator", "group", "head_params", "us_per_example", "layers", the metrics
of `metrics.fidelity` against the test MC DPV, the same prefixed "ref_"
against the reference run, "estimate" (the per-example estimates), and
extras of the estimator (for example "features", "unsupported").
"""

import numpy as np

from dropvar_tf import metrics


def score_row(task, data, rate, estimator, group, estimate, t_test, ref,
              **extra):
  """A result row: the estimate scored against the test MC DPV (and ref).

  Args:
    task: the task name.
    data: the short label of the data.
    rate: the dropout rate.
    estimator: the estimator's name.
    group: "head", "baseline" or "ceiling".
    estimate: per-example estimates, or None for an estimator that does not
      apply (the row then has no scores).
    t_test: the test MC DPV the row is scored against.
    ref: the reference MC DPV, or None.
    **extra: more keys of the row; they override the defaults.

  Returns:
    The row dict.
  """
  row = {"task": task, "data": data, "rate": rate, "estimator": estimator,
         "group": group, "head_params": None, "us_per_example": None,
         "layers": None}
  if estimate is not None:
    estimate = np.asarray(estimate, "float64")
    row.update(metrics.fidelity(estimate, t_test))
    if ref is not None:
      row.update({"ref_" + k: v for k, v in
                  metrics.fidelity(estimate, ref).items()})
    row["estimate"] = estimate.tolist()
  row.update(extra)
  return row


def find_row(rows, task, rate, estimator):
  """The first row of `estimator` at (task, rate), or None."""
  for r in rows:
    if (r["task"] == task and r["rate"] == rate and
        r["estimator"] == estimator):
      return r
  return None


def tasks_in(rows):
  """The tasks of `rows`, in order of first appearance."""
  tasks = []
  for r in rows:
    if r["task"] not in tasks:
      tasks.append(r["task"])
  return tasks


def rates_in(rows, task):
  """The sorted dropout rates of `task`'s rows."""
  return sorted({r["rate"] for r in rows if r["task"] == task})
