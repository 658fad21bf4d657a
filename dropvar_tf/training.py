"""Fit a dual model's variation head against MC-dropout targets.

The base model stays frozen by construction: the head's input features are
computed once with the base in inference mode (dropout off, BatchNormalization
using its moving statistics), then only the head's weights are trained on them.
Calling `dual.fit` directly would instead run the base with dropout on.
"""

import contextlib
import json
import logging
import warnings

import numpy as np

from dropvar_tf._keras import keras, tf
from dropvar_tf import head_layers
from dropvar_tf import heads
from dropvar_tf import inputs
from dropvar_tf import keras_graph
from dropvar_tf import layers as probe_layers
from dropvar_tf import metrics
from dropvar_tf import validation


def num_examples(x):
  """Number of examples in an array, a dict of arrays, or None for datasets."""
  if isinstance(x, dict):
    if not x:
      raise validation.invalid("x", "a non-empty dict of arrays", x)
    lengths = {k: len(v) for k, v in x.items()}
    if len(set(lengths.values())) != 1:
      raise validation.invalid("x", "arrays of one common length", lengths)
    return next(iter(lengths.values()))
  if isinstance(x, tf.data.Dataset):
    return None
  if x is None:
    raise validation.invalid("x", "an array, a dict of arrays or a "
                             "tf.data.Dataset", x)
  return len(x)


def head_features(dual, x, batch_size=256, output=None):
  """Computes the head's input features for `x` (inference mode).

  Args:
    dual: a dual model from `add_variation_head`.
    x: inputs of the base model, in any form `inputs.normalize` reads
      (arrays, dicts, lists, numpy strings, ragged, a Dataset), or a
      `inputs.ModelInputs` it made.
    batch_size: examples per forward pass.
    output: the output name whose head's features to compute, for a dual
      of a multi-output model (`heads.dual_output_names`).

  Returns:
    A list of float32 arrays, one per head input, each (N, d_i) (the
    out-of-range signal a prior's correction shrinks with: (N, 1)).

  Raises:
    ValueError: `x` does not match the model's inputs (`inputs.normalize`).
  """
  return _predict_features(dual, x, heads.head_feature_tensors(dual, output),
                           batch_size)


def out_of_range_features(dual, x, batch_size=256):
  """Computes the features the out-of-range signal reads, for `x`.

  Args:
    dual: a dual model made with `add_variation_head(out_of_range=True)`.
    x: inputs of the base model, as for `head_features`.
    batch_size: examples per forward pass.

  Returns:
    A list of float32 arrays, one per input of the `head_layers.OutOfRange`
    layer (the probe features), each (N, d_i).

  Raises:
    ValueError: `dual` has no out-of-range signal, or `x` does not match
      the model's inputs.
  """
  return _predict_features(dual, x, heads.out_of_range_feature_tensors(dual),
                           batch_size)


def _predict_features(dual, x, tensors, batch_size):
  """`tensors` of `dual`'s graph computed for `x`, as (N, d_i) arrays."""
  if not isinstance(x, inputs.ModelInputs):
    x = inputs.normalize(dual, x)
  feature_model = keras.Model(dual.input, tensors)
  # Called eagerly batch by batch, not `feature_model.predict`: each new
  # model's predict step is a new tf.function of the same code, and TF
  # counts their traces together, so that the next `predict` of the user's
  # warns of "excessive retracing". A Dataset: it takes numpy strings.
  parts = []
  for (batch,) in x.as_dataset(batch_size):
    # A tuple: the inputs of a list-input model.
    out = feature_model(list(batch) if isinstance(batch, tuple) else batch,
                        training=False)
    parts.append([np.asarray(f, "float32") for f in tf.nest.flatten(out)])
  return [np.concatenate([p[i] for p in parts]).reshape(x.num_examples, -1)
          for i in range(len(parts[0]))]


def _check_targets(targets, n, units, arg="targets"):
  if targets is None:
    raise validation.invalid(arg, "an array of MC-dropout DPV targets",
                             targets)
  if isinstance(targets, dict):
    raise validation.invalid(
        arg, "an array of MC-dropout DPV targets (a dict is for a dual of a "
        "model with several outputs)", f"a dict with keys {sorted(targets)}")
  try:
    t = np.asarray(targets, "float64")
  except (TypeError, ValueError) as e:
    raise validation.invalid(arg, "an array of MC-dropout DPV targets",
                             type(targets).__name__) from e
  if t.ndim == 2 and t.shape[1] == 1 and units == 1:
    t = t[:, 0]
  expected = (n,) if units == 1 else (n, units)
  if n is not None and t.shape != expected:
    raise validation.invalid(
        arg, f"shape {expected} (one target per example of `x`)",
        f"array of shape {t.shape}")
  if not np.all(np.isfinite(t)):
    raise validation.invalid(
        arg, "finite values (no NaN or Inf)",
        f"array with {int(np.sum(~np.isfinite(t)))} non-finite values")
  if np.any(t < 0):
    raise validation.invalid(arg, "non-negative standard deviations",
                             f"array with minimum {t.min()}")
  if t.size and not np.any(t > 0):
    raise validation.invalid(
        arg, "some positive DPV (all are 0; likely causes: dropout "
        "was not sampled (rate 0, or targets of another model), or the "
        "predictions are saturated on these inputs, e.g. probabilities of "
        "exactly 0 or 1 on inputs far from the training data)",
        f"array of {t.size} zeros")
  return t


_LOGGER = logging.getLogger(__name__)
_FLOAT32_MAX = float(np.finfo("float32").max)
# A delta prior that explains less than this share of the variance of the
# training targets' log (`_prior_explained`) is also tried silenced.
MIN_PRIOR_EXPLAINED = 0.0
# Estimates are capped at this multiple of the largest fitted target...
_MAX_VALUE_FACTOR = 1.5
# ... or, with a smoothed output-delta prior (the std of a probability, so
# never above 0.5, and corrected within bounds), at 0.5, the largest std a
# probability has: far off the calibration data the prior is what knows
# how large the variation gets (docs/measurements.md).
_PROBABILITY_STD_CAP = 0.5
# A head with a prior corrects it within the central 99% of the log-space
# corrections its training targets needed.
CORRECTION_QUANTILE = 0.99

def _reset_head_layers(layers, seed):
  """Re-initialises the head's layers, so refitting starts afresh."""
  for i, layer in enumerate(layers):
    init = keras.initializers.GlorotUniform(seed=seed + i)
    if isinstance(layer, head_layers.HeadInputDense):
      layer.set_full_kernel(init(layer.full_kernel().shape))
      layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    elif isinstance(layer, keras.layers.Dense):
      layer.kernel.assign(init(layer.kernel.shape))
      if layer.use_bias:
        layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    elif isinstance(layer, keras.layers.Dropout):
      # Its mask stream moves on with every training step: restart it from
      # the fit's seed, so that a refit with the same seed is identical.
      state = layer.seed_generator.state
      state.assign(np.array([seed + i, 0], state.dtype))


def _train_head(head, out_layer, feats, prior, mlp_feats, t, train_idx,
                val_idx, cap, batch_size, epochs, learning_rate, seed,
                patience, calibrate, verbose):
  """Trains the head's layers; sets the output's center, cap and scale.

  `feats` are every head input on every row, `mlp_feats` those of its
  layers, `prior` the prior (or None). The output's correction window (with
  a prior) is already set, its scale 1 and its cap off. Returns the
  `keras.callbacks.History`.
  """
  raw = out_layer.to_raw(t, prior).astype("float32")
  if out_layer.units == 1:
    raw = raw[:, None]
  if out_layer.shrink:
    out_layer.correction_center.assign(float(raw[train_idx].mean()))
  features = np.concatenate(mlp_feats, axis=1)
  mean = features[train_idx].mean(axis=0)
  std = features[train_idx].std(axis=0)
  std = np.where(std > 1e-6, std, 1.0)
  features = ((features - mean) / std).astype("float32")
  trainable = [l for l in head.layers
               if isinstance(l, (head_layers.HeadInputDense,
                                 keras.layers.Dense, keras.layers.Dropout))]
  first = trainable[0]
  _reset_head_layers(trainable, seed)

  def dataset(idx, shuffle):
    ds = tf.data.Dataset.from_tensor_slices((features[idx], raw[idx]))
    if shuffle:
      ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)

  # Train the head's layers (below the output transform) on standardised
  # features and transformed targets, then fold the standardisation in.
  trainer_in = keras.Input((features.shape[1],), name="standardised_features")
  # The first layer takes the head's inputs as a list: split them back.
  cuts = [int(i) for i in np.cumsum([f.shape[1] for f in mlp_feats])[:-1]]
  z = keras.ops.split(trainer_in, cuts, axis=-1) if cuts else [trainer_in]
  for layer in trainable:
    z = layer(z)
  trainer = keras.Model(trainer_in, z)
  trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
  callbacks = []
  val_ds = None
  if len(val_idx):
    val_ds = dataset(val_idx, shuffle=False)
    callbacks.append(keras.callbacks.EarlyStopping(
        patience=patience, restore_best_weights=True))
  history = trainer.fit(dataset(train_idx, shuffle=True),
                        validation_data=val_ds, epochs=epochs,
                        callbacks=callbacks, verbose=verbose,
                        shuffle=False)  # the dataset shuffles, seeded

  _fold_standardisation(first, mean, std)
  out_layer.max_value.assign(cap)
  if calibrate:
    # On the capped estimates: a few uncapped ones far above the targets
    # would otherwise shrink every estimate. (Served is min(scale * v,
    # cap), not scale * min(v, cap): the two differ only where v or
    # scale * v is above the cap.)
    idx = val_idx if len(val_idx) else train_idx
    est = _head_outputs(head, [f[idx] for f in feats]).astype("float64")
    denom = float(np.sum(est * est))
    if denom > 0:
      out_layer.scale.assign(float(np.sum(est * t[idx])) / denom)
  return history


def _prior_explained(t, prior, eps):
  """Share of the variance of log(t + eps) that subtracting the prior removes.

  1 - Var(log(t + eps) - log(prior + eps)) / Var(log(t + eps)): what is left
  for the head to learn with the prior against without it. At most 1; 0 or
  less when the prior's log scatters the targets more than it aligns them.
  Per output unit, the smallest; 1 when the targets' log does not vary.
  """
  t = np.asarray(t, "float64").reshape(len(t), -1)
  p = np.maximum(np.asarray(prior, "float64").reshape(t.shape), 0.0)
  log_t = np.log(t + eps)
  total = log_t.var(axis=0)
  left = (log_t - np.log(p + eps)).var(axis=0)
  share = np.where(total > 0, 1.0 - left / np.where(total > 0, total, 1.0),
                   1.0)
  return float(share.min())


def _silence_prior(layer):
  """Makes an `OutputDropoutDelta` prior (and feature) 0 for every input."""
  for weight in [layer.kernel] + list(layer.sensitivities):
    weight.assign(np.zeros(weight.shape, weight.dtype))
  if layer.smoothed:
    layer.bias.assign(np.zeros(layer.bias.shape, layer.bias.dtype))
    layer.smoothing.assign(0.0)  # the linearised form: exactly 0


def _restore_prior(dual, layer):
  """Undoes `_silence_prior`: the output layer's kernel (and bias) again.

  The sensitivities and the smoothing are fitted again after this.
  """
  dense = keras_graph.source_layer(heads.layer_input_tensors(dual, layer)[1])
  layer.kernel.assign(np.asarray(dense.kernel.numpy(), "float32"))
  if layer.smoothed:
    if dense.use_bias:
      layer.bias.assign(np.asarray(dense.bias.numpy(), "float32"))
    layer.smoothing.assign(1.0)


def _fold_standardisation(first, mean, std):
  """Makes `first` act on raw features as it was trained on standardised ones.

  f((x - mean) / std) = x @ (W / std[:, None]) + (b - (mean / std) @ W).
  """
  w = first.full_kernel().astype("float64")
  b = first.bias.numpy().astype("float64")
  first.set_full_kernel((w / std[:, None]).astype("float32"))
  first.bias.assign((b - (mean / std) @ w).astype("float32"))


def _head_outputs(head, feats, batch_size=1024):
  """The head's outputs on `feats`, called directly in batches.

  Not `head.predict`: its compiled step retraces for every new last-batch
  size, and the subsets evaluated here all have different sizes.
  """
  n = len(feats[0])
  parts = [np.asarray(head([f[i:i + batch_size] for f in feats],
                           training=False))
           for i in range(0, n, batch_size)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def fit_variation_head(dual, x, targets, epochs=30, batch_size=64,
                       validation_split=0.1, learning_rate=1e-3, seed=0,
                       num_samples=None, patience=10, calibrate=True,
                       report_split=0.1, verbose=0):
  """Trains the head of `dual` on MC-dropout targets, base frozen.

  Fit on inputs the base model was NOT trained on (a held-out calibration
  split, unlabeled or perturbed inputs): on its own training inputs a model is
  overconfident and a head fitted there underestimates DPV on new data.

  Self-assessment: a `report_split` part of the inputs is held out from both
  training and calibration; the head's estimates there give a fit report
  (`metrics.fit_report`: held-out Spearman, R^2, ratio of means and the
  analytic `metrics.noise_bound` of targets with `num_samples`), stored
  under "fit_report" in the head metadata (so exports carry it). When the
  fit is far below the bound a `UserWarning` says why.

  Side effects: updates only the head's weights (with the feature
  standardisation folded into its first layer, the output `eps`, `scale`
  and `max_value`, and the prior's own weights: its fitted scale and
  sensitivities, or zeros where it is silenced) and its metadata; base
  weights and the dual model's compile state are unchanged. A call that
  raises leaves the head's weights and metadata as they were. Deterministic
  for a `seed`. May warn (see above).

  Prior: a head with an output-delta prior (`add_variation_head(prior=
  "delta")`, the "auto" choice on models ending in Dropout -> Dense) that
  explains none of the variance of the targets' log (where the dropout the
  prior sees makes little of the DPV, as with drop-connect in residual
  blocks) is fitted a second time with the prior silenced (0 for every
  input, so the head learns the whole log DPV, its correction window
  lifted; the delta feature, the same layer, is 0 too), and the fit that
  ranks the validation rows better is kept; "prior_explained" and
  "prior_silenced" in the head metadata say which. That needs at least 2
  validation rows (never with `validation_split=0`) and costs a second
  fit. A later fit starts from the prior again.

  Out-of-range signal: for a dual made with `out_of_range=True`, the range
  of `head_layers.OutOfRange` is set on the same training part of the
  inputs (the probe features of the rows the head trains on), and the
  signal's share above 0 and 99th percentile on the report's held-out part
  are recorded under "out_of_range" in the head metadata (with
  "held_out": None when there is no report).

  Args:
    dual: a dual model from `add_variation_head`.
    x: N inputs in any form the model takes (`inputs.normalize`: arrays,
      dicts, lists, numpy strings, ragged, or a `tf.data.Dataset` of
      examples or batches in a fixed order, of `x` or of `(x, targets)`).
    targets: DPV targets, shape (N,) or (N, k), from `mc_dropout_targets` with
      the head's statistic; for a dual of a multi-output model, a dict of
      them keyed by output name (as `mc_dropout_targets` returns it there),
      each output's head fitted on its own targets. None takes them from a
      Dataset of `(x, targets)`.
    epochs: maximum training epochs.
    batch_size: head training batch size.
    validation_split: fraction (0 <= f < 1) held out, chosen by `seed`, for
      early stopping and the output scale calibration.
    learning_rate: Adam learning rate.
    seed: seed for the split and the shuffling.
    num_samples: T of the MC targets (an integer >= 2, or None when
      unknown), recorded in the head metadata.
    patience: early-stopping patience in epochs.
    calibrate: fit the output scale by least squares on the held-out part
      (on the training part when `validation_split` is 0).
    report_split: fraction (0 <= f < 1) held out, chosen by `seed`, for the
      fit report only; 0 stores no report, and so do inputs too few for it
      to hold out 2 (with a logged reason).
    verbose: Keras verbosity.

  Returns:
    The `keras.callbacks.History` of the head's training; for a dual of a
    multi-output model, a dict of them keyed by output name.

  Raises:
    ValueError: `dual` has no head; `x` does not match the model's input
      spec, is empty or has NaN/Inf values (see `inputs.normalize`);
      `targets` do not match `x` (length, shape), contain NaN/Inf or
      negative values, or are all zero; or an argument is out of range.
  """
  names = heads.dual_output_names(dual)
  data = inputs.normalize(dual, x)
  n = data.num_examples
  if targets is None:
    targets = data.labels()
  if num_samples is not None:
    num_samples = validation.check_int(num_samples, "num_samples", 2)
  epochs = validation.check_int(epochs, "epochs", 1)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  patience = validation.check_int(patience, "patience", 0)
  seed = validation.check_int(seed, "seed", 0)
  learning_rate = validation.check_number(
      learning_rate, "learning_rate", "a number > 0", lambda v: v > 0)
  for arg, value in (("validation_split", validation_split),
                     ("report_split", report_split)):
    if not 0.0 <= value < 1.0:
      raise validation.invalid(arg, "a float in [0, 1)", value)
  settings = dict(epochs=epochs, batch_size=batch_size,
                  validation_split=validation_split,
                  learning_rate=learning_rate, seed=seed,
                  num_samples=num_samples, patience=patience,
                  calibrate=calibrate, report_split=report_split,
                  verbose=verbose)
  # The out-of-range signal's range is the probes', shared by every head:
  # set once, with the first head's split.
  settings["fit_range"] = heads.out_of_range_layer(dual) is not None
  if names is None:
    with _restored_on_error(dual):
      return _fit_head(dual, None, data, targets, n, **settings)
  if not isinstance(targets, dict) or sorted(targets) != sorted(names):
    raise validation.invalid(
        "targets", f"a dict of target arrays keyed by the output names "
        f"{names} (what `mc_dropout_targets` returns for this model)",
        sorted(targets) if isinstance(targets, dict) else
        f"{type(targets).__name__}")
  for name in names:  # every output's targets checked before any fit
    _check_targets(targets[name], n,
                   heads.variation_output_layer(dual, name).units,
                   f"targets[{name!r}]")
  histories = {}
  with _restored_on_error(dual):
    for name in names:
      histories[name] = _fit_head(dual, name, data, targets[name], n,
                                  **settings)
      settings["fit_range"] = False
  return histories


@contextlib.contextmanager
def _restored_on_error(dual):
  """Puts back the head's weights and metadata when the block raises.

  A fit that fails (a bad split, an interrupt, an error half-way through a
  second fit with the prior silenced) leaves `dual` as it was, never a
  head whose weights and metadata disagree.
  """
  weights = heads.head_variables(dual)
  values = [w.numpy() for w in weights]
  layers = [heads.variation_output_layer(dual, name)
            for name in heads.dual_output_names(dual) or [None]]
  metadata = [json.dumps(dict(layer.metadata)) for layer in layers]
  try:
    yield
  except BaseException:
    for weight, value in zip(weights, values):
      weight.assign(value)
    for layer, saved in zip(layers, metadata):
      layer.metadata.clear()
      layer.metadata.update(json.loads(saved))
    raise


def _fit_out_of_range(dual, x, train_idx, report_idx):
  """Sets the out-of-range signal's range on the training rows of `x`.

  The report's rows, held out, tell how the signal reads on calibration
  inputs it was not set on: the share above 0 and the 99th percentile, a
  threshold a server can start from. Recorded under "out_of_range" in the
  metadata of every head. Returns the signal on every row of `x`, (N,).
  """
  layer = heads.out_of_range_layer(dual)
  feats = out_of_range_features(dual, x)
  layer.set_range(np.concatenate([f[train_idx] for f in feats], axis=1))
  held_out = None
  if len(report_idx):
    signal = np.asarray(layer([f[report_idx] for f in feats]), "float64")
    held_out = {"num_examples": int(len(report_idx)),
                "share_above_zero": float(np.mean(signal > 0)),
                "quantile_99": float(np.quantile(signal, 0.99))}
  record = {"fitted": True, "quantile": layer.quantile, "unit": "half-width",
            "num_examples": int(len(train_idx)), "held_out": held_out}
  for name in heads.dual_output_names(dual) or [None]:
    # update(), not item assignment: Keras tracks what update() adds (as
    # it does the fit report), where an assigned plain dict gets wrapped by
    # TF's tracking on export and no longer serialises to JSON.
    heads.variation_output_layer(dual, name).metadata.update(
        {"out_of_range": dict(record)})
  return np.asarray(layer(feats), "float32")


# The largest noise scale with which a smoothed output delta stays smoothed.
MAX_NOISE_SCALE = 2.0
# `OutputDropoutDelta.noise_scale` values tried by `_fit_prior_noise_scale`.
_NOISE_SCALES = np.exp(np.linspace(np.log(0.25), np.log(16.0), 49))


def _fit_prior_sensitivities(dual, layer, values, idx, chunk=1024):
  """Sets the earlier-dropout sensitivities of a smoothed output delta.

  For each earlier dropout input `h_i` of `layers.OutputDropoutDelta`
  `layer` (`values[1 + i]`, `values[0]` its `h`, for every calibration
  row), the logit's gradient `g` with respect to `h_i` is computed on the
  training rows `idx` by running the layers between them
  (`heads.earlier_dropouts`), and the sensitivity becomes
  `sqrt(p_i / (1 - p_i)) * sqrt(sum g**2 h_i**2 / sum h_i**2)` per unit (0
  where `h_i` is 0 on every row).

  Raises:
    RuntimeError: the dual's graph no longer has the dropouts the layer was
      built on.
  """
  tensors = heads.layer_input_tensors(dual, layer)
  found = heads.earlier_dropouts(keras_graph.graph_nodes(dual), tensors[0])
  inputs = tensors[2:]
  if [id(f[1]) for f in found[:len(inputs)]] != [id(t) for t in inputs]:
    raise RuntimeError(f"{layer.name!r}: its earlier dropout inputs are not "
                       "those below its input any more")
  for (dropout, _, chain), value, weight in zip(found, values[1:],
                                                layer.sensitivities):
    x = np.asarray(value)[idx]
    num = np.zeros(x.shape[1], "float64")
    den = np.zeros(x.shape[1], "float64")
    for i in range(0, len(x), chunk):
      part = tf.convert_to_tensor(x[i:i + chunk])
      with tf.GradientTape() as tape:
        tape.watch(part)
        v = part
        for chained in chain:
          v = chained(v, training=False)
        logit, _ = layer.logit_and_spread(v)
        total = tf.reduce_sum(logit)
      g = np.asarray(tape.gradient(total, part), "float64")
      sq = np.square(np.asarray(part, "float64"))
      num += np.sum(np.square(g) * sq, axis=0)
      den += np.sum(sq, axis=0)
    a = np.sqrt(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    weight.assign((a * (dropout.rate / (1.0 - dropout.rate)) ** 0.5).astype(
        "float32"))


def _fit_prior_noise_scale(layer, values, t, idx, out_layer):
  """Fits the noise scale (and smoothing) of a smoothed output-delta prior.

  The scale widens the logit spread of the dropouts the layer sees for the
  dropout it does not see (`layers.OutputDropoutDelta` `layer`, whose
  inputs `values` (`h`, then the earlier dropout inputs) are for every
  calibration row). It is the one that leaves the head the least
  to correct: the smallest variance, over the training rows `idx`, of the
  log-space gap between targets `t` and prior. The caller computes the
  head's inputs again at that scale.
  """
  parts = [layer.logit_and_std(values[0][i:i + 4096],
                               [v[i:i + 4096] for v in values[1:]])
           for i in range(0, len(values[0]), 4096)]
  logit = tf.concat([p[0] for p in parts], axis=0)
  spread = tf.concat([p[1] for p in parts], axis=0)
  eps = float(out_layer.eps.numpy()) if (
      out_layer.transform == head_layers.LOG) else 1e-6
  target = np.log(np.asarray(t, "float64")[idx].reshape(len(idx), -1) + eps)
  logit, spread = tf.gather(logit, idx), tf.gather(spread, idx)
  best = None
  for scale in _NOISE_SCALES:
    prior = probe_layers.smoothed_sigmoid_std(logit, spread * float(scale))
    gap = target - np.log(np.asarray(prior, "float64") + eps)
    spread_of_gap = float(np.var(gap))
    if best is None or spread_of_gap < best[0]:
      best = (spread_of_gap, float(scale))
  layer.noise_scale.assign(best[1])
  # Above MAX_NOISE_SCALE the targets' shape asks for a logit spread far
  # wider than the last dropout's: there (the recurrent models of
  # docs/zoo.md) the smoothed form misranked inputs unlike the calibration
  # ones, so the prior is the linearised delta again.
  layer.smoothing.assign(1.0 if best[1] <= MAX_NOISE_SCALE else 0.0)


def _prior_noise_scale(dual, output):
  layer = heads.smoothed_prior_layer(dual, output)
  return None if layer is None else float(layer.noise_scale.numpy())


def _fit_head(dual, output, x, targets, n, epochs, batch_size,
              validation_split, learning_rate, seed, num_samples, patience,
              calibrate, report_split, verbose, fit_range=False):
  """Fits the head of `output` (None: the only head); see above."""
  out_layer = heads.variation_output_layer(dual, output)
  head = heads.variation_head(dual, output)
  arg = "targets" if output is None else f"targets[{output!r}]"
  units = out_layer.units
  _check_targets(targets, n, units, arg)
  prior_layer = heads.prior_layer(dual, output)
  if out_layer.metadata.get("prior_silenced"):
    # An earlier fit silenced the prior: this one starts from it again.
    _restore_prior(dual, prior_layer)
  smoothed = heads.smoothed_prior_layer(dual, output)
  tensors = list(heads.head_feature_tensors(dual, output))
  num_prior_inputs = 0
  if smoothed is not None:
    # h, and the inputs of the earlier dropout layers (not y).
    prior_tensors = heads.layer_input_tensors(dual, smoothed)
    prior_tensors = [prior_tensors[0]] + list(prior_tensors[2:])
    num_prior_inputs = len(prior_tensors)
    tensors.extend(prior_tensors)
  feats = _predict_features(dual, x, tensors, 256)
  prior_input = None
  if num_prior_inputs:
    prior_input = feats[-num_prior_inputs:]
    del feats[-num_prior_inputs:]
  t = _check_targets(targets, len(feats[0]), units, arg)
  # With a prior, the head's last inputs are the prior and, if the
  # correction shrinks off the calibration range, the out-of-range signal:
  # the layers learn only the log-space correction of the prior from the
  # other inputs.
  prior = None
  extra = 0
  if out_layer.prior_bound is not None:
    extra = 2 if out_layer.shrink else 1
    prior = feats[-extra]
  if out_layer.shrink:
    feats[-1] = feats[-1].reshape(-1)  # the signal is (batch,)
  n = len(t)
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  n_val = int(round(n * validation_split))
  n_report = int(round(n * report_split))
  if report_split and n_report < 2:
    # Fitting matters more than its report: too few inputs to hold out
    # the 2 a rank correlation needs leave all of them to the fit.
    _LOGGER.warning(
        "No fit report: report_split=%s of %d calibration inputs holds "
        "out %d; a report needs at least 2.", report_split, n, n_report)
    n_report = 0
  if validation_split and n_val < 1:
    raise validation.invalid(
        "validation_split", f"a fraction holding out at least 1 of the {n} "
        "calibration inputs for validation (or 0: no validation; more "
        "calibration inputs are better)", validation_split)
  if n - n_report - n_val < 1:
    # Name the split that holds out more: shrinking it is the fix.
    arg, value = (("report_split", report_split) if n_report > n_val else
                  ("validation_split", validation_split))
    raise validation.invalid(
        arg, f"fractions leaving calibration inputs to train on: of {n}, "
        f"validation_split={validation_split} holds out {n_val} and "
        f"report_split={report_split} {n_report}", value)
  # Validation first, the report's part last: the validation split is the
  # same whether a report is made or not.
  val_idx = order[:n_val]
  train_idx = order[n_val:n - n_report]
  report_idx = order[n - n_report:]
  if fit_range:
    far = _fit_out_of_range(dual, x, train_idx, report_idx)
    if out_layer.shrink:
      feats[-1] = far
  if out_layer.transform == head_layers.LOG:
    positive = t[t > 0]
    eps = max(0.05 * float(np.median(positive)) if positive.size else 1e-3,
              1e-6)
    out_layer.eps.assign(eps)
  if prior is not None:
    if smoothed is not None:
      if smoothed.earlier_dims:
        _fit_prior_sensitivities(dual, smoothed, prior_input, train_idx)
      _fit_prior_noise_scale(smoothed, prior_input, t, train_idx, out_layer)
      # The prior, and the log of it among the head's features, at the
      # fitted scale: every head input again, as the dual now computes it
      # (the out-of-range range is already set).
      feats = _predict_features(dual, x, tensors[:len(feats)], 256)
      if out_layer.shrink:
        feats[-1] = feats[-1].reshape(-1)
      prior = feats[-extra]
    explained = _prior_explained(t[train_idx], prior[train_idx],
                                 float(out_layer.eps.numpy()))

  def train(feats, silenced):
    """Fits the head on `feats` (the prior's bound lifted if `silenced`)."""
    prior, mlp_feats = (feats[-extra], feats[:-extra]) if extra else (
        None, feats)
    out_layer.scale.assign(1.0)  # to_raw divides by it
    out_layer.max_value.assign(_FLOAT32_MAX)
    if prior is not None:
      # The head may correct its prior only as much as the training part of
      # the calibration targets needed (central CORRECTION_QUANTILE of
      # them), within the prior's bound unless the prior is silenced.
      bound = _FLOAT32_MAX if silenced else out_layer.prior_bound
      out_layer.correction_low.assign(-bound)
      out_layer.correction_high.assign(bound)
      needed = out_layer.to_raw(t[train_idx], prior[train_idx])
      low, high = np.quantile(needed, [(1 - CORRECTION_QUANTILE) / 2,
                                       (1 + CORRECTION_QUANTILE) / 2])
      out_layer.correction_low.assign(float(low))
      out_layer.correction_high.assign(float(high))
    return _train_head(head, out_layer, feats, prior, mlp_feats, t,
                       train_idx, val_idx, cap, batch_size, epochs,
                       learning_rate, seed, patience, calibrate, verbose)

  # The cap comes from the training rows only: the report's rows stay
  # unseen.
  cap = _MAX_VALUE_FACTOR * float(t[train_idx].max()) + 1e-12
  if smoothed is not None:
    cap = _PROBABILITY_STD_CAP
  history = train(feats, False)
  silenced = False
  layer = prior_layer
  if (prior is not None and n_val >= 2 and explained < MIN_PRIOR_EXPLAINED
      and isinstance(layer, probe_layers.OutputDropoutDelta)):
    # A delta prior that explains none of the targets' log-space variance
    # (the dropout it sees makes little of the DPV, e.g. drop-connect in
    # residual blocks) may still rank them (as the GRU's of docs/zoo.md
    # does): the head is fitted both ways, the second time with the prior
    # silenced (0 for every input, and so is the delta feature: the head
    # learns the whole log DPV on the same graph), and the fit that ranks
    # the validation rows better is kept.
    def ranks(feats):
      est = _head_outputs(head, [f[val_idx] for f in feats])
      rho = metrics.fidelity(est.astype("float64").ravel(),
                             t[val_idx].ravel())["spearman"]
      return rho if np.isfinite(rho) else -np.inf  # constant: no ranking

    kept = ranks(feats)
    weights = [w.numpy() for w in head.weights + layer.weights]
    _silence_prior(layer)
    quiet = _predict_features(dual, x, tensors[:len(feats)], 256)
    if out_layer.shrink:
      quiet[-1] = quiet[-1].reshape(-1)
    quiet_history = train(quiet, True)
    if ranks(quiet) > kept:
      silenced, history, feats = True, quiet_history, quiet
    else:
      for w, value in zip(head.weights + layer.weights, weights):
        w.assign(value)
  prior = feats[-extra] if extra else None
  report = None
  if n_report:
    report = metrics.fit_report(
        _head_outputs(head, [f[report_idx] for f in feats]), t[report_idx],
        num_samples)
    if report["far_below_bound"]:
      warnings.warn(
          ("" if output is None else f"Output {output!r}: ") +
          "The variation head fits its held-out calibration inputs far "
          "below what targets of this noise allow: "
          f"{'; '.join(report['far_below_bound'])}. Likely causes: too few "
          "calibration inputs or epochs, a head too small, or targets of "
          "too few samples.", stacklevel=3)
  out_layer.metadata.update({
      "fit_report": report,
      "num_samples": None if num_samples is None else int(num_samples),
      "seed": int(seed),
      "num_train_examples": int(len(train_idx)),
      "output_eps": float(out_layer.eps.numpy()),
      "output_scale": float(out_layer.scale.numpy()),
      "output_max_value": float(out_layer.max_value.numpy()),
      "prior_noise_scale": _prior_noise_scale(dual, output),
      "prior_smoothed": None if smoothed is None else bool(
          smoothed.smoothing.numpy() > 0.5),
      "prior_correction_center": float(
          out_layer.correction_center.numpy()) if out_layer.shrink else None,
      "prior_explained": None if prior is None else explained,
      "prior_silenced": None if prior is None else silenced,
      "prior_correction": None if prior is None else [
          float(out_layer.correction_low.numpy()),
          float(out_layer.correction_high.numpy())],
  })
  return history


def train_variation_head(model, x, num_samples=100, seed=0, num_perturbed=16000,
                         perturb_noise=0.5, perturb_swap=0.3, epochs=60,
                         batch_size=64, target_batch_size=256, progress=None,
                         **head_kwargs):
  """Adds a variation head to `model` and fits it, in one call.

  The recommended route: the head is fitted on `num_perturbed` perturbed
  copies of `x` (`augment.perturb_inputs`) labelled with MC-dropout targets,
  so it sees inputs that look unseen to the model even when `x` is the model's
  own training data. With `num_perturbed=0` it is fitted on `x` itself: pass a
  held-out calibration split then.

  Side effects: none on `model` (see `add_variation_head`).

  Args:
    model: a trained Keras model with dropout (any kind, one or several
      outputs: see `add_variation_head`).
    x: inputs to fit on or to perturb, in any form the model takes
      (`inputs.normalize`; the `y` of a Dataset of `(x, y)` is ignored).
    num_samples: T, stochastic passes per MC target.
    seed: seed of the perturbations, the MC masks and the head training.
    num_perturbed: perturbed inputs to make; 0 fits on `x` as given.
    perturb_noise: float-feature noise level (see `perturb_inputs`).
    perturb_swap: integer-feature swap probability (see `perturb_inputs`).
    epochs: maximum head training epochs.
    batch_size: head training batch size.
    target_batch_size: batch size of the MC target passes.
    progress: progress bar for the MC targets (None: automatic).
    **head_kwargs: passed to `add_variation_head` (layers, features, ...).

  Returns:
    The fitted dual model.

  Raises:
    ValueError: as `add_variation_head`, `mc_dropout_targets` and
      `fit_variation_head` do; `x` is checked against `model`'s input spec
      (`inputs.normalize`) before it is perturbed.
  """
  from dropvar_tf import augment
  from dropvar_tf import targets as targets_lib
  num_perturbed = validation.check_int(num_perturbed, "num_perturbed", 0)
  dual = heads.add_variation_head(model, seed=seed, **head_kwargs)
  # Checked before perturbing: a NaN row would spread to its perturbed
  # copies and be counted there. Against the dual's inputs: a subclassed
  # model has none of its own.
  data = inputs.normalize(dual, x)
  names = heads.dual_output_names(dual)
  if names is None:
    statistic = heads.variation_head_metadata(dual)["statistic"]
  else:
    statistic = {n: heads.variation_head_metadata(dual, n)["statistic"]
                 for n in names}
  fit_x = data.materialize() if isinstance(x, tf.data.Dataset) else x
  if num_perturbed:
    fit_x = augment.perturb_inputs(fit_x, num_perturbed,
                                   noise=perturb_noise, swap=perturb_swap,
                                   seed=seed)
  fit_t = targets_lib.mc_dropout_targets(
      model, fit_x, num_samples=num_samples, seed=seed,
      batch_size=target_batch_size, statistic=statistic, progress=progress)
  fit_variation_head(dual, fit_x, fit_t, epochs=epochs, batch_size=batch_size,
                     seed=seed, num_samples=num_samples)
  return dual
