"""How good a DPV estimate is: against MC targets, and the targets themselves.

* `fidelity`, `decile_auc`, `decile_table`: how well a one-pass variation
  estimate matches MC-dropout DPV targets.
* `fit_report`, `noise_bound`: a fitted head's self-assessment on held-out
  calibration inputs, next to the best that targets of T samples allow.
* `mc_convergence`, `noise_ceiling`: how reliable the MC targets are at a
  given number of samples (`targets.split_half_targets`,
  `targets.mc_dropout_targets`), hence the best agreement any estimate can
  reach.

Correlations come from `scipy.stats`; R^2 and ROC AUC are computed here with
numpy and `scipy.stats.rankdata` (the same values as scikit-learn's, which
the core library does not depend on).

Example:

```python
scores = fidelity(dual.predict(x)["variation"], mc_targets)
convergence = mc_convergence(model, x, num_samples=100)  # is T=100 enough?
```
"""

import numpy as np
from scipy import stats

from dropvar_tf import targets
from dropvar_tf import validation


def _as_array(values, arg):
  """`values` as a float64 array of finite numbers.

  Raises:
    ValueError naming `arg`: not numbers (a multi-output dict is refused
      with how to score it), or NaN or Inf values.
  """
  if isinstance(values, dict):
    raise validation.invalid(
        arg, "an array of per-example values (for a model with several "
        "outputs, score each output: e.g. fidelity(estimate[name], "
        "targets[name]))", f"dict with keys {sorted(values)}")
  if values is None:
    raise validation.invalid(arg, "an array of per-example values", values)
  try:
    v = np.asarray(values, "float64")
  except (TypeError, ValueError):
    raise validation.invalid(
        arg, "numbers", f"{type(values).__name__} that is not numeric"
    ) from None
  if not np.all(np.isfinite(v)):
    raise validation.invalid(arg, "finite values (no NaN or Inf)",
                             f"array with {int(np.sum(~np.isfinite(v)))} "
                             "non-finite values")
  return v


def _as_vector(values, arg):
  v = _as_array(values, arg)
  if v.ndim == 2 and v.shape[1] == 1:
    v = v[:, 0]
  if v.ndim != 1 or v.size < 2:
    raise validation.invalid(arg, "a 1-D array of at least 2 values",
                             f"array of shape {v.shape}")
  return v


def _as_pair(estimate, target, target_arg="target"):
  """`estimate` and `target` as vectors of the same length."""
  e = _as_vector(estimate, "estimate")
  t = _as_vector(target, target_arg)
  if e.shape != t.shape:
    raise validation.invalid("estimate", f"shape {t.shape} like "
                             f"`{target_arg}`", f"array of shape {e.shape}")
  return e, t


def _r2(target, estimate):
  """Coefficient of determination of `estimate` as a prediction of `target`.

  As `sklearn.metrics.r2_score`: 1.0 for a perfect estimate, and 0.0 (not
  -inf or NaN) for an imperfect estimate of constant targets.
  """
  residual = np.sum((target - estimate)**2)
  if residual == 0:
    return 1.0
  # Constant targets: their mean, rounded, would leave a total of ~1e-33.
  if np.ptp(target) == 0:
    return 0.0
  total = np.sum((target - np.mean(target))**2)
  return float(1.0 - residual / total)


def _roc_auc(labels, scores):
  """ROC AUC: the chance a positive outscores a negative (ties count 1/2).

  The Mann-Whitney U of the positives over n_pos * n_neg, from midranks.
  """
  ranks = stats.rankdata(scores)
  num_pos = int(np.sum(labels))
  num_neg = labels.size - num_pos
  u = np.sum(ranks[labels]) - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def decile_auc(estimate, target, top=True, fraction=0.1):
  """AUC of `estimate` for telling the top (or bottom) `fraction` of `target`.

  Examples are labelled positive when their target is at or above (at or
  below, for the bottom) the target of rank `round(fraction * N)` from the
  top (bottom); the score is the estimate (negated for the bottom). Targets
  tied with that one are all positive, so the value does not depend on the
  examples' order (with many exact zeros, the bottom "decile" is every
  zero). When that makes every example positive, those strictly above
  (below) it are the positives instead (the 5 nonzero targets of 100, for
  the top 10% of 95 zeros).

  Args:
    estimate: (N,) estimated DPV.
    target: (N,) MC-dropout DPV.
    top: the top (True) or the bottom (False) of the targets.
    fraction: the share of examples labelled positive, in (0, 1).

  Returns:
    The AUC, or NaN when the targets are constant.

  Raises:
    ValueError: lengths differ, fewer than 2 values, non-finite values, or
      `fraction` not in (0, 1).
  """
  e, t = _as_pair(estimate, target)
  fraction = _check_fraction(fraction)
  k = max(1, int(round(fraction * len(t))))
  ordered = np.sort(t)
  cut = ordered[-k] if top else ordered[k - 1]
  labels = t >= cut if top else t <= cut
  if labels.all():
    labels = t > cut if top else t < cut
  if labels.all() or not labels.any():
    return float("nan")
  return _roc_auc(labels, e if top else -e)


def _check_fraction(fraction):
  if (isinstance(fraction, bool) or
      not isinstance(fraction, (int, float, np.floating)) or
      not 0.0 < fraction < 1.0):
    raise validation.invalid("fraction", "a number in (0, 1)", fraction)
  return float(fraction)


def decile_table(estimate, target, bins=10):
  """Mean target and mean estimate per decile of the estimate.

  Args:
    estimate: (N,) estimated DPV.
    target: (N,) MC-dropout DPV.
    bins: number of bins, 1 to N.

  Returns:
    A dict of arrays: "estimate_mean", "target_mean", "count", one entry per
    bin, bins ordered by increasing estimate.

  Raises:
    ValueError: lengths differ, non-finite values, or `bins` out of range.
  """
  e, t = _as_pair(estimate, target)
  bins = validation.check_int(bins, "bins", 1)
  if bins > len(e):
    raise validation.invalid(
        "bins", f"at most the number of examples ({len(e)})", bins)
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
  e, t = _as_pair(estimate, mc_targets, "mc_targets")
  constant = np.ptp(e) == 0 or np.ptp(t) == 0
  log_e, log_t = np.log(1e-6 + np.maximum(e, 0)), np.log(1e-6 + t)
  return {
      "pearson": float("nan") if constant else float(stats.pearsonr(e, t)[0]),
      "spearman": (float("nan") if constant else
                   float(stats.spearmanr(e, t)[0])),
      "kendall": (float("nan") if constant else
                  float(stats.kendalltau(e, t)[0])),
      "r2": _r2(t, e),
      "r2_log": _r2(log_t, log_e),
      "mae": float(np.mean(np.abs(e - t))),
      "auc_top10": decile_auc(e, t, top=True),
      "auc_bottom10": decile_auc(e, t, top=False),
      "n": int(len(t)),
  }


def _correlation(function, a, b):
  """`function(a, b)`'s statistic; NaN for fewer than 2 or constant values."""
  if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(function(a, b)[0])


def mc_convergence(model, x, num_samples=100, seed=0, batch_size=256,
                   statistic="auto", keys=None):
  """How stable the DPV estimate is at `num_samples` (split-half reliability).

  The T samples are split into two independent halves (samples [0, T//2) and
  [T//2, T)); each gives a DPV estimate (`targets.split_half_targets`). Their
  agreement measures sampling noise; the full-T estimate (identical to
  `mc_dropout_targets` with the same arguments) is more reliable than either
  half by the Spearman-Brown formula.

  For the "noise ceiling" of a head trained on these targets, compare two
  independent full-T runs with different seeds: `noise_ceiling(...)`. No
  predictor of the targets can correlate with them better than they
  correlate with themselves.

  Args:
    model, x, num_samples, seed, batch_size, statistic, keys: as in
      `targets.mc_dropout_targets` (`num_samples` >= 4 so that halves have 2
      samples).

  Returns:
    dict with "pearson" and "spearman" (between the halves' DPVs, all values
    flattened; NaN for fewer than 2 values or constant DPVs), "reliability"
    (Spearman-Brown corrected Pearson of the full-T estimate: 2r / (1 + r)),
    "mean_relative_std_error" (root-mean-square over values with positive
    DPV of |half_a - half_b| / (2 * dpv_full), an estimate of the relative
    standard error of the full-T DPV), "num_samples" and "num_examples".
    For a model with several outputs, {output name: that dict}.

  Raises:
    ValueError: an invalid argument, named in the message.
  """
  a, b, full = targets.split_half_targets(
      model, x, num_samples=num_samples, seed=seed, batch_size=batch_size,
      statistic=statistic, keys=keys)
  if isinstance(full, dict):
    return {name: _convergence(a[name], b[name], full[name], num_samples)
            for name in full}
  return _convergence(a, b, full, num_samples)


def _convergence(a, b, full, num_samples):
  """`mc_convergence`'s dict for one output's halves and full-T targets."""
  num_examples = full.shape[0]
  a, b, full = (v.astype(np.float64).ravel() for v in (a, b, full))
  r = _correlation(stats.pearsonr, a, b)
  rho = _correlation(stats.spearmanr, a, b)
  positive = full > 0
  rel = (np.abs(a - b)[positive] / (2.0 * full[positive]))
  return {
      "pearson": r,
      "spearman": rho,
      "reliability": 2.0 * r / (1.0 + r) if r > -1 else float("nan"),
      "mean_relative_std_error": float(np.sqrt(np.mean(rel * rel)))
                                 if rel.size else float("nan"),
      "num_samples": int(num_samples),
      "num_examples": int(num_examples),
  }


def noise_ceiling(model, x, num_samples=100, seeds=(0, 1), **kwargs):
  """Two independent full-T target arrays (different seeds).

  Their correlation is the noise ceiling of any predictor of the targets:
  `np.corrcoef(a.ravel(), b.ravel())[0, 1]`.

  Args:
    model, x, num_samples: as in `targets.mc_dropout_targets`.
    seeds: two different seeds.
    **kwargs: other `targets.mc_dropout_targets` arguments (not `seed`).

  Returns:
    (targets_a, targets_b), each as returned by `mc_dropout_targets`.

  Raises:
    ValueError: `seeds` is not two different integers, or another invalid
      argument.
  """
  if (not isinstance(seeds, (list, tuple)) or len(seeds) != 2 or
      seeds[0] == seeds[1]):
    raise validation.invalid("seeds", "two different integer seeds", seeds)
  return tuple(targets.mc_dropout_targets(model, x, num_samples=num_samples,
                                          seed=s, **kwargs) for s in seeds)


# `fit_report` flags a held-out fit (and `fit_variation_head` warns) that is
# far below the noise bound: R^2 below this fraction of the bound's R^2,
# Spearman more than this far below the bound's correlation, or a ratio of
# means outside [1 / RATIO, RATIO].
REPORT_MIN_R2_FRACTION = 0.5
REPORT_MAX_CORRELATION_GAP = 0.2
REPORT_MAX_MEAN_RATIO = 2.0


def _finite_or_none(value):
  """JSON-safe float: NaN (a constant estimate's correlation) becomes None."""
  value = float(value)
  return value if np.isfinite(value) else None


def _text(value):
  return "undefined" if value is None else f"{value:.3f}"


def noise_bound(targets, num_samples):
  """Best agreement any estimate can reach with MC targets of `num_samples`.

  An analytic bound from the targets' own sampling noise: the std of T
  Gaussian samples has a sampling variance of about `dpv**2 / (2 (T - 1))`,
  so of the targets' variance across examples a fraction `noise = mean(t**2)
  / (2 (T - 1)) / var(t)` is noise that no estimate can predict. Then the
  best R^2 is `1 - noise` and the best correlation `sqrt(1 - noise)`.
  Dropout outputs are not Gaussian (a predicted-class probability is closer
  to two-valued), so the bound is approximate; `mc_convergence`
  measures the split-half reliability on data instead.

  Args:
    targets: MC-dropout DPV targets, any shape (flattened).
    num_samples: T of the targets, an integer >= 2.

  Returns:
    A dict: "method" ("gaussian_sampling_noise"), "num_samples", "r2" and
    "correlation" (None when the targets are constant).

  Raises:
    ValueError: `targets` are not finite numbers (a dict of a model's
      outputs included: bound each output), or `num_samples` < 2.
  """
  t = _as_array(targets, "targets").ravel()
  num_samples = validation.check_int(num_samples, "num_samples", 2)
  variance = float(np.var(t))
  bound = {"method": "gaussian_sampling_noise", "num_samples": num_samples,
           "r2": None, "correlation": None}
  if variance > 0:
    noise = float(np.mean(t * t)) / (2.0 * (num_samples - 1)) / variance
    r2 = max(0.0, 1.0 - noise)
    bound.update(r2=r2, correlation=float(np.sqrt(r2)))
  return bound


def fit_report(estimate, targets, num_samples=None):
  """How well a head's estimates match held-out MC targets.

  Args:
    estimate: the head's estimates on held-out inputs, (N,) or (N, k).
    targets: their MC-dropout DPV targets, same shape.
    num_samples: T of the targets (None: no noise bound).

  Returns:
    A JSON-able dict: "num_examples", "spearman", "r2" (of the estimate as a
    prediction of the targets), "mean_ratio" (mean estimate / mean target),
    "noise_bound" (`noise_bound`, or None), and "far_below_bound" with the
    reasons (an empty list when the fit is near the bound). Values that are
    undefined (constant estimates) are None.

  Raises:
    ValueError: `estimate` or `targets` are not finite numbers (dicts of a
      model's outputs included: report on each output), or their sizes
      differ.
  """
  e = _as_array(estimate, "estimate").ravel()
  t = _as_array(targets, "targets").ravel()
  if e.shape != t.shape:
    raise validation.invalid("estimate", f"{t.size} values like `targets`",
                             f"{e.size} values")
  scores = fidelity(e, t) if len(t) >= 2 else {}
  report = {
      "num_examples": int(np.shape(targets)[0]) if np.ndim(targets) else 1,
      "spearman": _finite_or_none(scores.get("spearman", float("nan"))),
      "r2": _finite_or_none(scores.get("r2", float("nan"))),
      "mean_ratio": _finite_or_none(np.mean(e) / np.mean(t))
                    if np.mean(t) > 0 else None,
      "noise_bound": None if num_samples is None else noise_bound(
          t, num_samples),
  }
  reasons = []
  bound = report["noise_bound"] or {}
  if bound.get("r2") and (report["r2"] is None or report["r2"] <
                          REPORT_MIN_R2_FRACTION * bound["r2"]):
    reasons.append(f"held-out R^2 {_text(report['r2'])} is below "
                   f"{REPORT_MIN_R2_FRACTION} x the bound {bound['r2']:.3f}")
  if bound.get("correlation") and (
      report["spearman"] is None or report["spearman"] <
      bound["correlation"] - REPORT_MAX_CORRELATION_GAP):
    reasons.append(f"held-out Spearman {_text(report['spearman'])} is more "
                   f"than {REPORT_MAX_CORRELATION_GAP} below the bound "
                   f"{bound['correlation']:.3f}")
  ratio = report["mean_ratio"]
  if ratio is not None and not (
      1.0 / REPORT_MAX_MEAN_RATIO <= ratio <= REPORT_MAX_MEAN_RATIO):
    reasons.append(f"mean estimate / mean target is {ratio:.3f}")
  report["far_below_bound"] = reasons
  return report
