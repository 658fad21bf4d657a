"""How well a one-pass variation estimate matches MC-dropout DPV."""

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

from dropvar_tf import validation


def _as_vector(values, arg):
  if values is None:
    raise validation.invalid(arg, "an array of per-example values", values)
  v = np.asarray(values, "float64")
  if v.ndim == 2 and v.shape[1] == 1:
    v = v[:, 0]
  if v.ndim != 1 or v.size < 2:
    raise validation.invalid(arg, "a 1-D array of at least 2 values",
                             f"array of shape {v.shape}")
  if not np.all(np.isfinite(v)):
    raise validation.invalid(arg, "finite values (no NaN or Inf)",
                             f"array with {int(np.sum(~np.isfinite(v)))} "
                             "non-finite values")
  return v


def decile_auc(estimate, target, top=True, fraction=0.1):
  """AUC of `estimate` for telling the top (or bottom) `fraction` of `target`.

  Examples are labelled positive when their target is in the top (bottom)
  `fraction`; the score is the estimate (negated for the bottom).
  """
  e = _as_vector(estimate, "estimate")
  t = _as_vector(target, "target")
  k = max(1, int(round(fraction * len(t))))
  order = np.argsort(t, kind="stable")
  labels = np.zeros(len(t), bool)
  labels[order[-k:] if top else order[:k]] = True
  if labels.all():
    return float("nan")
  return float(sk_metrics.roc_auc_score(labels, e if top else -e))


def decile_table(estimate, target, bins=10):
  """Mean target and mean estimate per decile of the estimate.

  Returns:
    A dict of arrays: "estimate_mean", "target_mean", "count", one entry per
    bin, bins ordered by increasing estimate.
  """
  e = _as_vector(estimate, "estimate")
  t = _as_vector(target, "target")
  order = np.argsort(e, kind="stable")
  parts = np.array_split(order, bins)
  return {
      "estimate_mean": np.array([e[p].mean() for p in parts]),
      "target_mean": np.array([t[p].mean() for p in parts]),
      "count": np.array([len(p) for p in parts]),
  }


def fidelity(estimate, mc_targets):
  """Agreement of a one-pass DPV estimate with MC-dropout targets.

  Args:
    estimate: (N,) estimated DPV (e.g. `dual.predict(x)["variation"]`).
    mc_targets: (N,) MC-dropout DPV for the same examples.

  Returns:
    A dict: pearson, spearman, kendall, r2 (coefficient of determination of
    the estimate as a prediction of the targets, not of a refitted line: a
    biased estimate scores lower), r2_log (the same on log(1e-6 + values)),
    mae, auc_top10 and auc_bottom10 (see `decile_auc`), n.

  Raises:
    ValueError: shapes differ, fewer than 2 values, or non-finite values.
  """
  e = _as_vector(estimate, "estimate")
  t = _as_vector(mc_targets, "mc_targets")
  if e.shape != t.shape:
    raise validation.invalid("estimate", f"shape {t.shape} like `mc_targets`",
                             f"array of shape {e.shape}")
  constant = np.ptp(e) == 0 or np.ptp(t) == 0
  log_e, log_t = np.log(1e-6 + np.maximum(e, 0)), np.log(1e-6 + t)
  return {
      "pearson": float("nan") if constant else float(stats.pearsonr(e, t)[0]),
      "spearman": (float("nan") if constant else
                   float(stats.spearmanr(e, t)[0])),
      "kendall": (float("nan") if constant else
                  float(stats.kendalltau(e, t)[0])),
      "r2": float(sk_metrics.r2_score(t, e)),
      "r2_log": float(sk_metrics.r2_score(log_t, log_e)),
      "mae": float(np.mean(np.abs(e - t))),
      "auc_top10": decile_auc(e, t, top=True),
      "auc_bottom10": decile_auc(e, t, top=False),
      "n": int(len(t)),
  }
