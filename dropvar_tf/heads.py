"""Add a variation head to a trained Keras model, and take it off again.

`add_variation_head` taps the post-activation outputs of chosen hidden layers
of an existing Functional or Sequential model, turns them into activation-
strength features with probe layers, and feeds them (with the model's own
prediction) to a small head network. The returned dual model has outputs
`{"prediction": ..., "variation": ...}` and shares every base weight with the
input model; the input model itself is not modified.
"""

import warnings

from dropvar_tf._keras import keras
from dropvar_tf import contract
from dropvar_tf import head_layers
from dropvar_tf import keras_graph
from dropvar_tf import layers as probe_layers
from dropvar_tf import sources
from dropvar_tf import tap_selection
from dropvar_tf import validation
from dropvar_tf.version import __version__

PROBE_PREFIX = "dropvar_probe_"
PREDICTION_FEATURES_NAME = "dropvar_prediction_features"
MOMENTS_NAME = "dropvar_moments"
DELTA_NAME = "dropvar_output_delta"

# Layers whose output is a post-activation hidden state worth tapping even
# when no Dropout follows them.
_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU,
                      keras.layers.LeakyReLU, keras.layers.ELU,
                      keras.layers.PReLU)
_SKIPPED = (keras.layers.InputLayer, keras.layers.Dropout)

# Analytic DPV estimates a head can correct instead of replacing
# (`add_variation_head(prior=...)`).
PRIOR_AUTO = "auto"
PRIOR_DELTA = "delta"
PRIOR_MOMENTS = "moments"
PRIORS = (None, PRIOR_AUTO, PRIOR_DELTA, PRIOR_MOMENTS)
# A head corrects its prior by at most this much in log space (a factor
# e**2, about 7.4, either way).
DEFAULT_PRIOR_BOUND = 2.0


# `add_variation_head(layers=...)` selections besides a list of names.
LAYER_SELECTIONS = ("auto", "all", "last")


def _check_layers_arg(layers):
  if isinstance(layers, str):
    if layers in LAYER_SELECTIONS:
      return layers
    return [layers]
  if isinstance(layers, (list, tuple)) and layers and all(
      isinstance(n, str) for n in layers):
    return list(layers)
  raise validation.invalid(
      "layers", '"auto", "all", "last", or a non-empty list of layer names',
      layers)


def candidate_layers(model):
  """Returns the hidden layers of `model` whose outputs can feed a head.

  A layer is a candidate when a Dropout layer reads its output, or when it
  applies a nonlinearity (a Dense or Conv layer with a non-linear activation,
  an Activation-type layer, or a nested model). Input, Dropout and output
  layers are never candidates, nor are shared layers (called more than once
  in the model: they have no single output to tap). Order is topological
  (input to output).

  Args:
    model: a built Functional or Sequential Keras model.

  Returns:
    A list of layers, possibly empty.

  Raises:
    ValueError: `model` is not a built Functional or Sequential model.
  """
  validation.check_model(model)
  nodes = keras_graph.graph_nodes(model)
  output_ops = {id(keras_graph.source_layer(t)) for t in model.outputs}
  feeds_dropout = set()
  for layer in model.layers:
    if isinstance(layer, keras.layers.Dropout):
      for inputs, _ in nodes.get(id(layer), []):
        feeds_dropout.update(id(keras_graph.source_layer(t)) for t in inputs)
  found = []
  for layer in model.layers:
    if (isinstance(layer, _SKIPPED) or id(layer) in output_ops or
        len(nodes.get(id(layer), ())) != 1):
      continue
    activation = getattr(layer, "activation", None)
    nonlinear = activation is not None and activation not in (
        keras.activations.linear, None)
    if (id(layer) in feeds_dropout or nonlinear or
        isinstance(layer, _ACTIVATION_LAYERS + (keras.Model,))):
      found.append(layer)
  return found


# Layers whose output is `activation(...)`, nothing added after it.
_ENDS_IN_ACTIVATION = (
    keras.layers.Activation, keras.layers.Dense, keras.layers.EinsumDense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose, keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D, keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D)


def _is_relu(layer):
  """True when `layer`'s output is a plain ReLU's (never negative).

  Only for layer types known to end in their activation: a custom layer
  with an `activation` attribute may add something after it (a residual).
  """
  if type(layer) is keras.layers.ReLU:
    return (not layer.negative_slope and float(layer.threshold) >= 0 and
            (layer.max_value is None or float(layer.max_value) >= 0))
  if type(layer) not in _ENDS_IN_ACTIVATION:  # subclasses may differ
    return False
  return layer.activation in (keras.activations.relu,
                              keras.activations.relu6)


def _resolve_taps(model, layers, features):
  """Returns [(layer, output tensor in `model`'s graph)] to tap."""
  candidates = candidate_layers(model)
  if layers == "auto":
    taps = tap_selection.select_layers(model, candidates, features)
  elif layers == "all":
    taps = candidates
  elif layers == "last":
    taps = candidates[-1:]
  else:
    by_name = {l.name: l for l in model.layers}
    unknown = [n for n in layers if n not in by_name]
    if unknown:
      raise validation.invalid(
          "layers",
          "names of layers of the model; candidates are "
          f"{[l.name for l in candidates]}", unknown)
    taps = [by_name[n] for n in layers]
  if not taps:
    raise validation.invalid(
        "layers", "a selection with at least one hidden layer to tap",
        f"{layers!r} (model {model.name!r} has no hidden candidate layers)")
  nodes = keras_graph.graph_nodes(model)
  tapped = []
  for layer in taps:
    calls = nodes.get(id(layer), [])
    if len(calls) != 1 or len(calls[0][1]) != 1:
      raise validation.invalid(
          "layers", "layers called exactly once in the model, with one "
          "output tensor (a shared layer has no single output to tap)",
          layer.name)
    tapped.append((layer, calls[0][1][0]))
  return tapped


def has_variation_head(model):
  """True when `model` is a dual model made by `add_variation_head`."""
  try:
    model.get_layer(contract.HEAD_NAME)
  except ValueError:
    return False
  return True


def _output_units(model):
  shape = model.outputs[0].shape
  return 1 if len(shape) < 2 else int(shape[-1])


def _statistic_units(statistic, units):
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    return 1
  return units


def _output_delta(model, include_delta, statistic, units):
  """Returns (log feature, DPV) tensors of `OutputDropoutDelta`, or Nones."""
  if not include_delta:
    return None, None
  out = model.outputs[0]
  layer = keras_graph.source_layer(out)
  nodes = keras_graph.graph_nodes(model)
  why = None
  activation = getattr(getattr(layer, "activation", None), "__name__", None)
  if not isinstance(layer, keras.layers.Dense):
    why = f"the output layer {layer.name!r} is not Dense"
  elif activation not in probe_layers.OUTPUT_ACTIVATIONS:
    why = f"output activation {activation!r} is not linear/sigmoid/softmax"
  else:
    dropped = nodes[id(layer)][0][0][0]
    dropout = keras_graph.source_layer(dropped)
    if (not isinstance(dropout, keras.layers.Dropout) or
        dropout.noise_shape is not None or len(dropped.shape) != 2):
      why = f"the input of {layer.name!r} does not come from a plain Dropout"
  if why:
    if include_delta == "auto":
      return None, None
    raise validation.invalid("include_delta", "a model whose output is a "
                             "Dense layer right after a Dropout layer", why)
  h = nodes[id(dropout)][0][0][0]
  delta = probe_layers.OutputDropoutDelta(
      rate=dropout.rate, activation=activation, statistic=statistic,
      input_dim=int(h.shape[-1]), units=units, dtype="float32",
      name=DELTA_NAME)
  value = delta([h, out])
  delta.kernel.assign(layer.kernel.numpy())
  return head_layers.LogFeature(nonnegative=True, dtype="float32",
                                name=DELTA_NAME + "_log")(value), value


def _moment_features(model, include_moments, statistic):
  """Returns a moment-propagation model, or None (with a warning on "auto")."""
  if not include_moments:
    return None
  try:
    from dropvar_tf import moments
    return moments.moment_model(model, statistic=statistic)
  # TypeError: a layer whose moments Keras cannot shape (variable lengths).
  except (ImportError, ValueError, TypeError) as e:
    if include_moments == "auto":
      warnings.warn(f"Moment-propagation features skipped: {e}",
                    stacklevel=2)
      return None
    raise


def add_variation_head(model, layers="auto", features=probe_layers.SUMMARY,
                       hidden_units=(16, 64), statistic=contract.STAT_AUTO,
                       include_prediction=True, include_delta="auto",
                       include_moments=False, transform=head_layers.LOG,
                       l2=1e-4, head_dropout=0.0, seed=0, name=None,
                       prior=PRIOR_AUTO, prior_bound=DEFAULT_PRIOR_BOUND):
  """Returns a dual model with outputs {"prediction", "variation"}.

  Like `tfmot.quantization.keras.quantize_model`, it takes an existing model
  and returns a transformed one. Side effects: none on `model`. The dual model
  reuses `model`'s layers, so weights are shared (not copied): training the
  base afterwards changes both; the one exception is the output-delta
  feature (`include_delta`), which keeps a copy of the output layer's kernel
  taken now, so add the head after the base is trained. The dual model is
  not compiled; train its head with `fit_variation_head`, which leaves the
  base weights untouched. Nested sub-models are tapped as a whole (their
  inner layers are not reachable).

  Args:
    model: a built, trained Functional or Sequential `keras.Model` with at
      least one Dropout layer and one output tensor. Subclassed models are
      refused (they have no symbolic graph to tap).
    layers: "auto" (default: a few candidate layers whose probes' estimated
      cost is bounded relative to the base's, preferring those a dropout
      source reads and those near the output; see `tap_selection`), "all"
      (every candidate hidden layer, see `candidate_layers`), "last" (the
      candidate closest to the output), or a list of layer names.
    features: "summary" (mean, L2 norm and fraction active per layer; default:
      as good as or better than per-neuron features on every task measured
      and steadier from fit to fit) or "neurons" (per-neuron activations;
      the cheaper of the two on conv feature maps, which summaries read
      four times: `bench/dual_bench.py --model=cnn`).
    hidden_units: widths of the head's hidden ReLU layers. The default
      (16, 64) starts narrow: the first layer, the only one as wide as the
      features, stays cheap next to the base model's layers
      (docs/measurements.md).
    statistic: the DPV statistic the head estimates (see `contract`):
      "auto", "std", "predicted_class_std" or "per_class_std".
    include_prediction: also feed features of the base prediction.
    include_delta: also feed the delta-method DPV of the dropout right
      before the output layer (`layers.OutputDropoutDelta`; one small
      matmul): True, False, or "auto" (when the model ends in Dropout ->
      Dense).
    include_moments: also feed the moment-propagation estimate
      (`dropvar_tf.moments`): True, False, or "auto" (when supported). It
      costs about two extra forward passes, so it is off by default.
    transform: "log" (train on log DPV; default) or "identity".
    l2: L2 weight penalty on the head's Dense kernels.
    head_dropout: dropout rate inside the head (off at inference).
    seed: seed of the head's initializers.
    name: name of the dual model (default "<model.name>_dual").
    prior: "auto" (default), "delta", "moments" or None: an analytic DPV
      estimate that the head only corrects, in log space within the range
      of corrections its calibration targets needed (see
      `head_layers.VariationOutput`), so that off its calibration data the
      estimate degrades to the prior's instead of extrapolating.
      "delta" (the output-delta feature, `include_delta`) costs one small
      matmul, but saturates where the output does. "moments" (moment
      propagation, `dropvar_tf.moments`) holds up on more shifts
      (`docs/shift.md`) but runs a second, heavier pass through the model
      on every request (`docs/measurements.md`). "auto": "delta" when the
      model ends in Dropout -> Dense (and `include_delta` is not False),
      else None. None: the head alone.
    prior_bound: the largest log-space correction of a prior either way.

  Returns:
    A `keras.Model` with the inputs of `model` and dict outputs
    {"prediction": model's output, "variation": (batch,) or (batch, k)}.

  Raises:
    ValueError: invalid `model` (None, not Keras, subclassed, unbuilt, no
      Dropout, several outputs, already has a head) or invalid arguments,
      e.g. unknown layer names.

  Example:
  >>> dual = add_variation_head(model)
  >>> out = dual.predict(x)   # {"prediction": ..., "variation": ...}
  """
  sources.check_dropout_model(model)
  if has_variation_head(model):
    raise validation.invalid(
        "model", "a model without a variation head (call "
        "`strip_variation_head` first to replace its head)",
        f"dual model {model.name!r}")
  if len(model.outputs) != 1:
    raise validation.invalid("model", "a model with exactly one output",
                             f"model {model.name!r} with "
                             f"{len(model.outputs)} outputs")
  layers = _check_layers_arg(layers)
  probe_layers.check_features(features)
  if not isinstance(hidden_units, (list, tuple)):
    raise validation.invalid("hidden_units",
                             "a list or tuple of positive integers",
                             hidden_units)
  hidden_units = [validation.check_int(u, "hidden_units", 1)
                  for u in hidden_units]
  units = _output_units(model)
  probabilities = keras_graph.output_is_probabilities(model)
  statistic = validation.resolve_statistic(statistic, units, probabilities)
  taps = _resolve_taps(model, layers, features)
  if prior not in PRIORS:
    raise validation.invalid("prior", f"one of {PRIORS}", prior)

  prediction = model.outputs[0]
  head_inputs = []
  # Feature layers compute in float32 whatever the dtype policy: float16
  # sums of squares overflow on wide layers.
  for layer, tensor in taps:
    probe = probe_layers.ActivationStrength(
        features=features, nonnegative=_is_relu(layer), dtype="float32",
        name=PROBE_PREFIX + layer.name)
    head_inputs.append(probe(tensor))
  if include_prediction:
    head_inputs.append(
        head_layers.PredictionFeatures(probabilities=probabilities,
                                       dtype="float32",
                                       name=PREDICTION_FEATURES_NAME)(
                                           prediction))
  auto = prior == PRIOR_AUTO
  want_moments = True if prior == PRIOR_MOMENTS else include_moments
  moment_net = _moment_features(model, want_moments, statistic)
  if auto:
    prior = PRIOR_DELTA if include_delta is not False else None
  want_delta = include_delta
  if prior == PRIOR_DELTA:
    want_delta = True if not auto or include_delta is True else "auto"
  delta, delta_value = _output_delta(model, want_delta, statistic, units)
  if prior == PRIOR_DELTA and delta is None:
    prior = None  # "auto" on a model that has neither
  if delta is not None:
    head_inputs.append(delta)
  moment_value = None
  if moment_net is not None:
    moment_value = moment_net(keras_graph.model_input(model))
    head_inputs.append(
        head_layers.LogFeature(dtype="float32", name=MOMENTS_NAME)(
            moment_value))
  prior_value = {PRIOR_DELTA: delta_value,
                 PRIOR_MOMENTS: moment_value}.get(prior)

  metadata = {
      "dropvar_tf_version": __version__,
      "statistic": statistic,
      "num_samples": None,
      "dropout_rates": {l.name: float(l.rate)
                        for l in keras_graph.dropout_layers(model)},
      "layers": [l.name for l, _ in taps],
      "features": features,
      "include_prediction": bool(include_prediction),
      "include_delta": delta is not None,
      "include_moments": moment_net is not None,
      "transform": transform,
      "base_model": model.name,
      "prior": prior,
      "prior_bound": None if prior is None else float(prior_bound),
  }
  head = _build_head(head_inputs, hidden_units,
                     _statistic_units(statistic, units), transform, l2,
                     head_dropout, seed, metadata, prior_value, prior_bound)
  if prior_value is not None:
    head_inputs = head_inputs + [prior_value]
  variation = head(head_inputs)
  return keras.Model(
      inputs=keras_graph.model_input(model),
      outputs={contract.PREDICTION_KEY: prediction,
               contract.VARIATION_KEY: variation},
      name=name or f"{model.name}_dual")


def _build_head(feature_tensors, hidden_units, out_units, transform, l2,
                head_dropout, seed, metadata, prior=None, prior_bound=None):
  """The head model: inputs the features, then the prior if there is one."""
  inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype,
                        name=f"head_in_{i}")
            for i, t in enumerate(feature_tensors)]
  prior_input = None
  if prior is not None:
    prior_input = keras.Input(shape=prior.shape[1:], dtype=prior.dtype,
                              name="head_prior")
  # No Normalization layer: `fit_variation_head` trains on standardised
  # features and folds the standardisation into the first layer, which
  # saves its element-wise ops on every served request.
  reg = keras.regularizers.L2(l2) if l2 else None
  x = head_layers.HeadInputDense(
      (list(hidden_units) + [out_units])[0],
      activation="relu" if hidden_units else "linear",
      kernel_regularizer=reg,
      kernel_initializer=keras.initializers.HeNormal(seed=seed),
      name="head_dense_0" if hidden_units else "head_out")(inputs)
  for i in range(len(hidden_units)):
    if head_dropout:
      x = keras.layers.Dropout(head_dropout, seed=seed,
                               name=f"head_dropout_{i}")(x)
    if i + 1 < len(hidden_units):
      x = keras.layers.Dense(
          hidden_units[i + 1], activation="relu", kernel_regularizer=reg,
          kernel_initializer=keras.initializers.HeNormal(seed=seed + i + 1),
          name=f"head_dense_{i + 1}")(x)
  if hidden_units:
    x = keras.layers.Dense(
        out_units, kernel_regularizer=reg,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100),
        name="head_out")(x)
  if prior_input is None:
    v = head_layers.VariationOutput(out_units, transform=transform,
                                    metadata=metadata,
                                    name="variation_output")(x)
    return keras.Model(inputs, v, name=contract.HEAD_NAME)
  v = head_layers.VariationOutput(
      out_units, transform=transform, metadata=metadata,
      prior_bound=float(prior_bound), name="variation_output")([x, prior_input])
  return keras.Model(inputs + [prior_input], v, name=contract.HEAD_NAME)


def variation_head(dual):
  """Returns the head sub-model of a dual model.

  Raises:
    ValueError: `dual` was not made by `add_variation_head`.
  """
  if not isinstance(dual, keras.Model) or not has_variation_head(dual):
    raise validation.invalid(
        "dual", "a dual model made by `add_variation_head`",
        dual if not isinstance(dual, keras.Model) else
        f"model {dual.name!r} without a variation head")
  return dual.get_layer(contract.HEAD_NAME)


def variation_output_layer(dual):
  """Returns the `VariationOutput` layer of a dual model's head."""
  return variation_head(dual).get_layer("variation_output")


def variation_head_metadata(dual):
  """Returns what the head estimates, as a JSON-able dict.

  Keys: dropvar_tf_version, statistic, num_samples (of the MC targets it was
  fitted on; None before fitting), dropout_rates, layers, features,
  include_prediction, include_moments, transform, base_model, prior,
  prior_bound, and after
  fitting seed, num_train_examples and fit_report (the held-out
  self-assessment of `training.fit_variation_head`, see
  `metrics.fit_report`; None when fitted with `report_split=0`).
  """
  return dict(variation_output_layer(dual).metadata)


def head_feature_tensors(dual):
  """Returns the symbolic tensors that feed the head, in head-input order."""
  head = variation_head(dual)
  calls = keras_graph.graph_nodes(dual).get(id(head), [])
  if len(calls) != 1:
    raise validation.invalid("dual", "a dual model whose head is called once",
                             f"{len(calls)} calls in model {dual.name!r}")
  return calls[0][0]


def strip_variation_head(dual):
  """Returns the plain model: the inverse of `add_variation_head`.

  The result is a Functional model with the dual model's inputs and the base
  prediction as its only output; it shares the base weights (no copy), so its
  predictions equal `dual(x)["prediction"]`.

  Raises:
    ValueError: `dual` has no variation head.
  """
  variation_head(dual)
  outputs = dual.output
  prediction = outputs[contract.PREDICTION_KEY]
  base_name = variation_head_metadata(dual).get("base_model") or dual.name
  return keras.Model(inputs=dual.input, outputs=prediction, name=base_name)
