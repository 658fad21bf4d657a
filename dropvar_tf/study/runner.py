"""The fidelity study: one-pass DPV estimators against MC dropout, per task.

For each task (MovieLens-100k rating regression, Criteo-like click-through,
digits and MNIST-5k classification) and each dropout rate, `run_study`:

1. trains the task's reference base model
   (`dropvar_tf.study.models.reference`) at that rate;
2. makes the calibration inputs the library's recommended route uses
   (`augment.perturb_inputs` of the training inputs, as
   `train_variation_head` does) and computes MC-dropout targets on them, and
   two independent MC target sets on the test split (the second one gives the
   noise ceiling);
3. fits variation heads with several feature sets on the calibration targets
   (`estimators.head_specs`: the library default, per-layer summaries +
   prediction + output-dropout delta; the same with per-neuron features; and
   the per-neuron layer-subset ablation: all layers, each single layer, the
   last layer; per-layer summaries alone) and the baselines
   (a head on prediction features only, a closed form of the prediction, a
   small regressor on the raw inputs, moment propagation);
4. scores every estimator against the test split's MC DPV
   (`metrics.fidelity`) and measures its cost (head parameters, one-pass
   time per example next to the T-pass MC time, `timing`);
5. checks the issue's goals (`checks.target_checks`) and writes
   `results.md`, `results.json` and PNG plots (`report.write_report`).

Base models and MC targets are cached under `StudyConfig.cache_dir` (keyed
by every setting that changes them, see `cache`), and so are each
configuration's result rows, so an interrupted run resumes where it stopped.

Example:

```python
from dropvar_tf.study import config, runner
results = runner.run_study(config.small_config(cache_dir="/tmp/cache"),
                           output_dir="/tmp/report")
print(results["paths"]["report"])
```
"""

import dataclasses
import os
import time
import warnings

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import moments
from dropvar_tf import training
from dropvar_tf.study import cache
from dropvar_tf.study import checks
from dropvar_tf.study import config as config_lib
from dropvar_tf.study import estimators
from dropvar_tf.study import report
from dropvar_tf.study import rows as rows_lib
from dropvar_tf.study import tasks
from dropvar_tf.study import timing
from dropvar_tf.study.data import common


def run_config(task, rate, config, split, data, log=print):
  """Runs one (task, dropout rate) configuration.

  Args:
    task: one of `config.TASKS`.
    rate: the dropout rate of the base model.
    config: a `StudyConfig`.
    split: the task's `Split` (`tasks.load_task`).
    data: the short label of the data, copied into every row.
    log: a print-like function for progress lines.

  Returns:
    (rows, info): a list of row dicts (one per estimator, with the fidelity
    metrics of `metrics.fidelity` against the test MC DPV, "head_params",
    "us_per_example"), and a dict of context (base quality, MC DPV means,
    MC time per example, candidate layers).

  Side effects: seeds Keras' global random state; reads and writes the
  stage cache (`cache`).
  """
  seed = config.seed
  keras.utils.set_random_seed(seed)
  model, base_seconds = cache.trained_base_model(task, split, rate, config,
                                                 log)
  quality = tasks.base_quality(task, model, split)
  fit_x = tasks.calibration_inputs(split, config)
  t = cache.mc_targets(task, model, fit_x, split, rate, config, log)
  t_fit, t_test = t["fit"].astype("float64"), t["test"].astype("float64")
  ref = cache.reference_targets(task, model, split, rate, config, log)
  timing_x = common.take(split.x_test, np.arange(
      min(config.timing_rows, len(split.y_test))))
  mc_s = timing.mc_seconds(model, timing_x, config.num_samples)
  base_s = timing.one_pass_seconds(model, timing_x)
  sweep = rate in config.sweep_rates
  kind = split.info["kind"]
  rows = []
  layer_names = [l.name for l in heads.candidate_layers(model)]

  def add(name, group, estimate, **extra):
    rows.append(rows_lib.score_row(task, data, rate, name, group, estimate,
                                   t_test, ref, **extra))

  for name, kwargs in estimators.head_specs(model, sweep):
    t0 = time.time()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      dual = heads.add_variation_head(model, seed=seed, **kwargs)
    training.fit_variation_head(
        dual, fit_x, t_fit, epochs=config.head_epochs,
        batch_size=config.head_batch_size, seed=seed,
        num_samples=config.num_samples)
    est = dual.predict(split.x_test, batch_size=1024,
                       verbose=0)[contract.VARIATION_KEY]
    meta = heads.variation_head_metadata(dual)
    add(name, estimators.HEAD, est,
        head_params=int(heads.variation_head(dual).count_params()),
        us_per_example=1e6 * timing.one_pass_seconds(dual, timing_x),
        layers=meta["layers"], features=meta["features"],
        include_prediction=meta["include_prediction"],
        include_moments=meta["include_moments"],
        fit_seconds=time.time() - t0)
    log(f"  {name}: Spearman {rows[-1]['spearman']:.3f}, "
        f"R2 {rows[-1]['r2']:.3f} ({time.time() - t0:.0f} s)")
    if name == estimators.SINGLE_PREFIX + layer_names[-1]:
      rows.append(dict(
          rows[-1], estimator=f"{estimators.LAST_LAYER} ({layer_names[-1]})",
          duplicate_of=name))

  est, params = estimators.prediction_head_estimate(model, fit_x, t_fit,
                                                    split.x_test, config)
  add(estimators.PREDICTION_HEAD, estimators.BASELINE, est,
      head_params=int(params))
  closed = estimators.closed_form_estimate(kind, model, split.x_test)
  if closed is not None:
    add(estimators.PREDICTION_CLOSED_FORM + (
        ": p(1-p)" if kind == common.BINARY else ": 1 - max prob"),
        estimators.BASELINE, closed, head_params=0)
  est, params = estimators.input_only_estimate(fit_x, t_fit, split.x_test,
                                               config)
  add(estimators.INPUT_ONLY, estimators.BASELINE, est,
      head_params=int(params))
  try:
    mp_model = moments.moment_model(model)
  except ValueError as e:
    add(estimators.MOMENT_PROPAGATION, estimators.BASELINE, None,
        unsupported=str(e).split("Received:")[-1].strip())
  else:
    add(estimators.MOMENT_PROPAGATION, estimators.BASELINE,
        mp_model.predict(split.x_test, batch_size=1024, verbose=0),
        head_params=0,
        us_per_example=1e6 * timing.one_pass_seconds(mp_model, timing_x))
  add(estimators.NOISE_CEILING, estimators.CEILING, t["test2"],
      us_per_example=1e6 * mc_s)
  info = {
      "task": task, "data": data, "rate": rate, "kind": kind,
      "quality": quality, "base_train_seconds": base_seconds,
      "mc_dpv_mean_fit": float(t_fit.mean()),
      "mc_dpv_mean_test": float(t_test.mean()),
      "mc_us_per_example": 1e6 * mc_s, "base_us_per_example": 1e6 * base_s,
      "num_samples": config.num_samples, "layers": layer_names,
      "test_targets": t_test.tolist(),
      "reference_samples": config.reference_samples if ref is not None
                           else None,
  }
  return rows, info


def run_study(config, output_dir, log=print):
  """Runs every configuration of `config` and writes the report.

  Args:
    config: a `StudyConfig`.
    output_dir: folder for results.md, results.json and the PNG plots.
    log: a print-like function for progress lines.

  Returns:
    dict with "rows" (all result rows), "configs" (per-configuration context),
    "checks" (the issue's targets, see `checks.target_checks`), "config",
    "seconds", "paths" (see `report.write_report`).

  Raises:
    ValueError: an invalid config.
    FileNotFoundError: a task's data wheel is missing.

  Side effects: writes the report to `output_dir`; reads and writes the
  stage cache (`cache`).
  """
  config_lib.check_config(config)
  all_rows, infos = [], []
  t_start = time.time()
  for task in config.tasks:
    split, data, data_full = tasks.load_task(task, config)
    for rate in config.dropout_rates:
      cached = cache.rows_path(task, rate, config)
      if cached and os.path.exists(cached):
        rows, info = cache.read_rows(cached)
        all_rows.extend(rows)
        infos.append(info)
        log(f"{task} rate {rate}: reused {cached}")
        continue
      log(f"{task} rate {rate}: {data_full}")
      t0 = time.time()
      rows, info = run_config(task, rate, config, split, data, log)
      info["seconds"] = time.time() - t0
      info["data_full"] = data_full
      all_rows.extend(rows)
      infos.append(info)
      if cached:
        cache.write_rows(cached, rows, info)
  results = {"config": dataclasses.asdict(config), "rows": all_rows,
             "configs": infos,
             "checks": checks.target_checks(all_rows) + (
                 checks.target_checks(all_rows, against="ref")
                 if config.reference_samples else []),
             "seconds": time.time() - t_start}
  results["paths"] = report.write_report(results, output_dir)
  return results
