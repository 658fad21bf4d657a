"""The estimators the study compares: variation heads and baselines.

Each estimator has a name (one row of the report each) and a group (`HEAD`,
`BASELINE` or `CEILING`). `head_specs` lists the variation heads to fit; the
`*_estimate` functions fit and run the baselines on the same calibration
targets as the heads.
"""

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf import head_layers
from dropvar_tf import heads
from dropvar_tf.study.data import common

# Estimator names (one row each in the report).
RECOMMENDED = ("head: summaries + prediction + output delta, analytic prior "
               "(default)")
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

# Estimator groups.
HEAD = "head"
BASELINE = "baseline"
CEILING = "ceiling"


def head_specs(model, sweep):
  """The heads to fit: list of (name, add_variation_head kwargs).

  Args:
    model: the base model (its candidate layers name the single-layer heads).
    sweep: with True, every feature set; otherwise only the recommended
      default.

  Returns:
    A list of (estimator name, kwargs of `heads.add_variation_head`).
  """
  specs = [(RECOMMENDED, {})]
  if not sweep:
    return specs
  # The layer-subset ablation uses per-neuron activations alone, without
  # an analytic prior.
  plain = {"include_prediction": False, "include_delta": False,
           "include_moments": False, "features": "neurons", "prior": None}
  specs.append((ALL_LAYERS, dict(plain, layers="all")))
  names = [l.name for l in heads.candidate_layers(model)]
  for name in names:
    specs.append((SINGLE_PREFIX + name, dict(plain, layers=[name])))
  specs.append((SUMMARY, dict(plain, layers="all", features="summary")))
  specs.append((NEURONS_RECIPE, dict(features="neurons")))
  return specs


def _log_target(t):
  """Transform of `fit_variation_head`: log(t + eps), eps = 5% of median."""
  positive = t[t > 0]
  eps = max(0.05 * float(np.median(positive)) if positive.size else 1e-3,
            1e-6)
  return np.log(t + eps).astype("float32"), eps


def _fit_regressor(model, x_fit, t_fit, x_test, config):
  """Trains `model` (raw output z) on log targets; returns test estimates.

  The same recipe as `fit_variation_head`: MSE on log(t + eps), 10% held out
  for early stopping and the least-squares output scale. Compiles and
  trains `model` in place.
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
  """Baseline: an MLP (64, 64) on the prediction features only.

  Args:
    model: the trained base model.
    fit_x: calibration inputs.
    t_fit: their MC DPV, float64.
    x_test: the inputs to estimate.
    config: a `StudyConfig` (seed, head epochs and batch size).

  Returns:
    (estimates on `x_test`, parameters of the regressor).
  """
  f_fit = prediction_features(model, fit_x)
  f_test = prediction_features(model, x_test)
  inputs = keras.Input(shape=(f_fit.shape[1],))
  norm = keras.layers.Normalization()
  norm.adapt(f_fit)
  reg = _mlp_on(inputs, norm(inputs), config.seed)
  return _fit_regressor(reg, f_fit, t_fit, f_test, config), reg.count_params()


def closed_form_estimate(kind, model, x):
  """Baseline without training: 1 - max prob (classes), p(1 - p) (binary).

  Args:
    kind: the task kind (`dropvar_tf.study.data.TASK_KINDS`).
    model: the base model.
    x: the inputs to estimate.

  Returns:
    A float64 array with one estimate per example, or None for regression
    (no closed form of the output alone).
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
      out[key] = np.where(values > x_fit[key].max(), 0, values)
    else:
      out[key] = values
  return out


def input_only_estimate(fit_x, t_fit, x_test, config):
  """Baseline: a small regressor on the raw inputs (no base model).

  Args:
    fit_x: calibration inputs.
    t_fit: their MC DPV, float64.
    x_test: the inputs to estimate; integer ids above those of `fit_x` are
      read as id 0.
    config: a `StudyConfig` (seed, head epochs and batch size).

  Returns:
    (estimates on `x_test`, parameters of the regressor).
  """
  reg = input_regressor(fit_x, config.seed)
  est = _fit_regressor(reg, fit_x, t_fit, _clip_ids(x_test, fit_x), config)
  return est, reg.count_params()
