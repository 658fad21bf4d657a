"""Add a variation head to a trained Keras model, and take it off again.

`add_variation_head` taps the post-activation outputs of chosen hidden layers
of an existing Keras model (Functional, Sequential, or subclassed: see
`functional_view`), turns them into activation-
strength features with probe layers, and feeds them (with the model's own
prediction) to a small head network. The returned dual model has outputs
`{"prediction": ..., "variation": ...}` (one pair per output of a
multi-output model: `contract.output_keys`) and shares every base weight
with the input model; the input model itself is not modified.
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
OUT_OF_RANGE_NAME = "dropvar_out_of_range"

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
    repeated = sorted({n for n in layers if list(layers).count(n) > 1})
    if repeated:
      raise validation.invalid("layers", "layer names, each once",
                               f"{list(layers)} (repeated: {repeated})")
    return list(layers)
  raise validation.invalid(
      "layers", '"auto", "all", "last", or a non-empty list of layer names',
      layers)


def functional_view(model, arg="model"):
  """Returns `(view, paths)`: `model` as a Functional graph of its layers.

  Functional and Sequential models are their own view. A subclassed model
  has no symbolic graph, so its `call` is run once on `keras.Input`s of the
  shapes it was built with: every Keras layer or `keras.ops` call inside it
  then records a node of a new Functional graph that holds the same layer
  objects (`keras_graph.functional_view`). That is chosen over recording
  activations while the model runs (a capture layer) because the view is
  an ordinary Functional model: the head's taps, the output-delta feature,
  `strip_variation_head`, the SavedModel export and the `.keras` format
  all work on it unchanged, under any tracing, with no state to restore.
  A `call` that Keras cannot run symbolically (raw TensorFlow ops, Python
  branches on tensor values) is refused with the reason.

  Args:
    model: a built `keras.Model`.
    arg: the argument name used in error messages.

  Returns:
    The Functional view and a dict `id(layer) -> path` naming the layers
    that come from inside subclassed models (`"<submodel>/<layer>"`, or
    the bare name for a bare subclassed model's own layers).

  Raises:
    ValueError: `model` is not a built Keras model, its `call` cannot be
      run on symbolic inputs, or it skips a dropout source with training
      off (`sources.check_called_sources`).
  """
  validation.check_model(model, arg=arg, allow_subclassed=True)
  try:
    view, paths = keras_graph.functional_view(model)
  except (TypeError, ValueError, NotImplementedError, AttributeError) as e:
    if "All operation names should be unique" in str(e):
      raise validation.invalid(
          arg, "a model whose layers have unique names (its subclassed "
          "parts become one Functional graph of their layers)",
          f"model {model.name!r}: {str(e).splitlines()[0]}") from e
    raise validation.invalid(
        arg, "a model whose subclassed parts call only Keras layers and "
        "`keras.ops` in `call` (so that it runs on `keras.Input`s), built "
        "by calling it on a batch",
        f"model {model.name!r}: {str(e).splitlines()[0]}") from e
  sources.check_called_sources(model, view, arg)
  return view, paths


def candidate_layers(model):
  """Returns the hidden layers of `model` whose outputs can feed a head.

  A layer is a candidate when a Dropout layer reads its output, when it
  applies a nonlinearity (a Dense or Conv layer with a non-linear activation,
  an Activation-type layer, or a nested model), or when it holds a dropout
  source or such a nonlinear layer (a custom layer's blocks, a
  `Bidirectional` RNN). Input, Dropout and output layers are never
  candidates, nor are shared layers (called more than once in the model:
  they have no single output to tap). Order is topological (input to
  output).

  Layers inside a subclassed model (bare, or a node of a Functional model)
  are candidates like any other: see `functional_view`.

  Args:
    model: a built Keras model (Functional, Sequential or subclassed).

  Returns:
    A list of layers, possibly empty.

  Raises:
    ValueError: `model` is not a built Keras model, or a subclassed model
      whose `call` Keras cannot run on symbolic inputs.
  """
  model, _ = functional_view(model)
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
    if (id(layer) in feeds_dropout or _nonlinear(layer) or
        isinstance(layer, keras.Model) or _holds_source_or_nonlinearity(
            layer)):
      found.append(layer)
  return found


def _nonlinear(layer):
  """Whether `layer` itself applies a nonlinearity."""
  activation = getattr(layer, "activation", None)
  return isinstance(layer, _ACTIVATION_LAYERS) or (
      activation is not None and activation not in (
          keras.activations.linear, None))


def _holds_source_or_nonlinearity(layer):
  """Whether a layer `layer` holds (at any depth) is a dropout source or
  applies a nonlinearity."""
  if sources.layer_sources(layer):
    return True
  pending = keras_graph.sublayers(layer)
  while pending:
    inner = pending.pop()
    if _nonlinear(inner):
      return True
    pending.extend(keras_graph.sublayers(inner))
  return False


def _tappable(layer):
  """Whether a layer named in `layers=[...]` can be probed.

  Dropout layers are not (in the one pass they pass their input through);
  inputs are when they hold floats (their strength is that of the raw
  features).
  """
  if isinstance(layer, keras.layers.InputLayer):
    return keras.backend.is_float_dtype(layer.dtype)
  return not isinstance(layer, _SKIPPED)


def _resolve_taps(model, layers, features, paths=None):
  """Returns [(layer, output tensor in `model`'s graph)] to tap.

  `paths` (from `functional_view`) adds each layer's path as a name.
  """
  candidates = candidate_layers(model)
  if layers == "auto":
    taps = tap_selection.select_layers(model, candidates, features)
  elif layers == "all":
    taps = candidates
  elif layers == "last":
    taps = candidates[-1:]
  else:
    by_name = {l.name: l for l in model.layers}
    by_name.update({paths[id(l)]: l for l in model.layers
                    if id(l) in (paths or {})})
    unknown = [n for n in layers if n not in by_name]
    if unknown:
      raise validation.invalid(
          "layers",
          "names of layers of the model; candidates are "
          f"{[l.name for l in candidates]}", unknown)
    taps = [by_name[n] for n in layers]
    output_ops = {id(keras_graph.source_layer(t)) for t in model.outputs}
    untappable = [n for n in layers if not _tappable(by_name[n]) or
                  id(by_name[n]) in output_ops]
    if untappable:
      raise validation.invalid(
          "layers", "hidden layers or float inputs (not a Dropout, an output "
          "layer, whose prediction the head reads itself, or an integer or "
          f"string input); candidates are {[l.name for l in candidates]}",
          untappable)
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


def _head_name(index, output_name):
  """The head of a single-output dual is HEAD_NAME; of output i, HEAD_NAME_i."""
  return contract.HEAD_NAME if output_name is None else (
      f"{contract.HEAD_NAME}_{index}")


def has_variation_head(model):
  """True when `model` is a dual model made by `add_variation_head`."""
  names = {l.name for l in getattr(model, "layers", ())}
  return contract.HEAD_NAME in names or _head_name(0, "") in names


def dual_output_names(dual):
  """The output names of a multi-output dual model; None for one output.

  In the base model's output order (see `keras_graph.output_names`).

  Raises:
    ValueError: `dual` has no variation head.
  """
  first = _heads(dual)[0]
  if first.name == contract.HEAD_NAME:
    return None
  return list(first.get_layer("variation_output").metadata["base_outputs"])


def _output_units(tensor):
  shape = tensor.shape
  return 1 if len(shape) < 2 else int(shape[-1])


def _statistic_units(statistic, units):
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    return 1
  return units


# At most this many earlier dropout layers feed a smoothed output delta.
MAX_EARLIER_DROPOUTS = 16


def _unit_noise(layer, tensor):
  """Whether `layer`, on its input `tensor`, multiplies each unit by its own
  noise of mean 1 and variance `rate / (1 - rate)`: a Dropout without a
  noise shape, or a GaussianDropout (the output delta's variance rule holds
  for both), on a (batch, d) input."""
  return (isinstance(layer, (keras.layers.Dropout,
                             keras.layers.GaussianDropout)) and
          getattr(layer, "noise_shape", None) is None and
          len(tensor.shape) == 2)


def earlier_dropouts(nodes, tensor):
  """The per-unit dropouts below `tensor` on a path of single-input layers.

  Per-unit: a Dropout without a noise shape, or a GaussianDropout.

  Walks down from `tensor` (the input of the dropout before the output
  layer) while each layer is called once, on one tensor and nothing else
  (no other argument: the fit replays the path as `layer(x,
  training=False)`), with one output, and stops at the first that is not
  (an input, a merge, a shared layer, a call with options).

  Args:
    nodes: `keras_graph.graph_nodes` of the model `tensor` belongs to.
    tensor: a symbolic tensor of that model.

  Returns:
    A list, nearest first, of (dropout layer, its input tensor, the layers
    from it up to `tensor`'s producer, in call order: what maps the
    dropout's inference output, equal to its input, to `tensor`); at most
    `MAX_EARLIER_DROPOUTS`.
  """
  found, path = [], []
  while len(found) < MAX_EARLIER_DROPOUTS:
    layer = keras_graph.source_layer(tensor)
    calls = nodes.get(id(layer), [])
    if (isinstance(layer, keras.layers.InputLayer) or len(calls) != 1 or
        len(calls[0][0]) != 1 or len(calls[0][1]) != 1 or
        not keras_graph.called_on_tensor_alone(tensor)):
      break
    below = calls[0][0][0]
    if _unit_noise(layer, below) and layer.rate > 0:
      found.append((layer, below, list(reversed(path))))
    path.append(layer)
    tensor = below
  return found


def _output_delta(model, out, include_delta, statistic, units, suffix="",
                  as_prior=False):
  """Returns (log feature, DPV) tensors of `OutputDropoutDelta`, or Nones.

  As the prior (`as_prior`), a smoothed delta of one logit (one sigmoid
  unit, or softmax's predicted class) also takes the earlier dropouts
  (`earlier_dropouts`), whose sensitivities `fit_variation_head` sets as it
  fits the prior's noise scale.
  """
  if not include_delta:
    return None, None
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
    if not _unit_noise(dropout, dropped):  # same shape as its input
      why = (f"the input of {layer.name!r} does not come from a Dropout or "
             "GaussianDropout on (batch, units)")
  if why:
    if include_delta == "auto":
      return None, None
    raise validation.invalid("include_delta", "a model whose output is a "
                             "Dense layer right after a Dropout (or "
                             "GaussianDropout) layer", why)
  h = nodes[id(dropout)][0][0][0]
  smoothed = probe_layers.smoothing_applies(activation, statistic)
  one_logit = (statistic == contract.STAT_PREDICTED_CLASS_STD or
               units == 1)
  earlier = []
  if smoothed and as_prior and one_logit:
    earlier = [e[1] for e in earlier_dropouts(nodes, h)]
  delta = probe_layers.OutputDropoutDelta(
      rate=dropout.rate, activation=activation, statistic=statistic,
      input_dim=int(h.shape[-1]), units=units, smoothed=smoothed,
      earlier_dims=[int(e.shape[-1]) for e in earlier],
      dtype="float32", name=DELTA_NAME + suffix)
  value = delta([h, out] + earlier)
  delta.kernel.assign(layer.kernel.numpy())
  if smoothed and layer.use_bias:
    delta.bias.assign(layer.bias.numpy())
  return head_layers.LogFeature(nonnegative=True, dtype="float32",
                                name=DELTA_NAME + suffix + "_log")(
                                    value), value


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


def add_variation_head(model, layers="auto", features=tap_selection.AUTO,
                       hidden_units=(16, 64), statistic=contract.STAT_AUTO,
                       include_prediction=True, include_delta="auto",
                       include_moments=False, transform=head_layers.LOG,
                       l2=1e-4, head_dropout=0.0, seed=0, name=None,
                       prior=PRIOR_AUTO, prior_bound=DEFAULT_PRIOR_BOUND,
                       out_of_range=False, shrink_out_of_range=True):
  """Returns a dual model with outputs {"prediction", "variation"}.

  Like `tfmot.quantization.keras.quantize_model`, it takes an existing model
  and returns a transformed one. Side effects: none on `model`. The dual model
  reuses `model`'s layers, so weights are shared (not copied): training the
  base afterwards changes both; the one exception is the output-delta
  feature (`include_delta`), which keeps a copy of the output layer's kernel
  taken now, so add the head after the base is trained. The dual model is
  not compiled; train its head with `fit_variation_head`, which leaves the
  base weights untouched. Nested Functional sub-models are tapped as a
  whole (their inner layers are not reachable); the layers a subclassed
  model calls (outside a Sequential one) are tapped one by one
  (`functional_view`), so the dual is a Functional model even when `model`
  is subclassed.

  Args:
    model: a built, trained `keras.Model` (Functional, Sequential or
      subclassed; a subclassed one built by calling it on a batch) with at
      least one dropout source; one output tensor, or a list or flat dict of
      them (one head per output, see Returns).
    layers: "auto" (default: a few candidate layers whose probes' estimated
      cost is bounded relative to the base's, preferring those a dropout
      source reads and those near the output; see `tap_selection`), "all"
      (every candidate hidden layer, see `candidate_layers`), "last" (the
      candidate closest to the output), or a list of layer names (for
      layers inside a subclassed model, their name or their path
      "<submodel>/<layer>"); a list may also name a float input (its
      probe reads the raw features), not a Dropout or an output layer.
    features: what each probe computes: "auto" (default: per-neuron
      values of a recurrent layer's final state, a summary of any other
      layer; `tap_selection.probe_features`), "summary" (mean, L2 norm and
      fraction active per layer: on feed-forward layers as good as or
      better than per-neuron features on every task measured and steadier
      from fit to fit) or "neurons" (per-neuron activations; the cheaper of
      the two on conv feature maps, which summaries read four times:
      `bench/dual_bench.py --model=cnn`), for every tapped layer.
    hidden_units: widths of the head's hidden ReLU layers. The default
      (16, 64) starts narrow: the first layer, the only one as wide as the
      features, stays cheap next to the base model's layers
      (docs/measurements.md).
    statistic: the DPV statistic the head estimates (see `contract`):
      "auto", "std", "predicted_class_std" or "per_class_std", resolved
      per output; for several outputs also a dict of them keyed by output
      name.
    include_prediction: also feed features of the base prediction.
    include_delta: also feed the delta-method DPV of the dropout right
      before the output layer (`layers.OutputDropoutDelta`, smoothed for
      sigmoid outputs and softmax's predicted class; its noise scale is
      fitted only when it is the prior, else 1): True, False, or "auto"
      (when the model ends in Dropout or GaussianDropout -> Dense).
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
      "delta" (the output-delta feature, `include_delta`) costs two small
      matmuls; for sigmoid outputs and softmax's predicted class it is
      smoothed (`layers.OutputDropoutDelta`), so it follows the chance of a
      flip where the output saturates; it also sees the Dropout (and
      GaussianDropout) layers further down a path of single-input layers
      (per-unit sensitivities that `fit_variation_head` sets from the
      logit's gradients on the calibration inputs), with a noise scale that
      `fit_variation_head` fits for the dropout it does not see.
      "moments" (moment
      propagation, `dropvar_tf.moments`) holds up on more shifts
      (`docs/shift.md`) but runs a second, heavier pass through the model
      on every request (`docs/measurements.md`). "auto": "delta" when the
      model ends in Dropout -> Dense (and `include_delta` is not False),
      else None. None: the head alone. A delta prior that explains none of
      the calibration targets may be silenced by the fit
      (`training.fit_variation_head`).
    prior_bound: the largest log-space correction of a prior either way
      (lifted where the fit silences the prior).
    out_of_range: also return "out_of_range" (`contract.OUT_OF_RANGE_KEY`),
      (batch,) float32 >= 0: how far the input's activation strengths (the
      probe features every head reads, before the head's standardisation)
      lie outside the range they had on the calibration inputs, in
      half-widths of that range (largest over features); 0 inside it
      (`head_layers.OutOfRange`). A few elementwise ops on features the
      heads compute anyway (docs/measurements.md). `fit_variation_head`
      sets the range; until then the signal is 0 and `export_saved_model`
      refuses the dual. A multi-output dual has one such output for the
      whole input. Off by default: the output keys stay exactly
      `contract.output_keys(names)`.
    shrink_out_of_range: with a prior, the head's correction of it shrinks
      toward the mean correction of its calibration rows as the input's
      probe features leave their calibration range (that same signal,
      computed whether or not it is an output; `head_layers.VariationOutput`):
      off its calibration data the estimate degrades to the prior's instead
      of extrapolating the head (`docs/shift.md`).

  Returns:
    A `keras.Model` with the inputs of `model` and dict outputs
    {"prediction": model's output, "variation": (batch,) or (batch, k)};
    for a model with several outputs, "prediction/<name>" and
    "variation/<name>" per output name (`contract.output_keys`,
    `dual_output_names`), each output with its own head; with
    `out_of_range`, "out_of_range" too.

  Raises:
    ValueError: invalid `model` (None, not Keras, unbuilt, no dropout
      source, a subclassed `call` Keras cannot run on `keras.Input`s,
      nested outputs, already has a head) or invalid arguments, e.g.
      unknown layer names, or moment propagation with several outputs.

  Example:
  >>> dual = add_variation_head(model)
  >>> out = dual.predict(x)   # {"prediction": ..., "variation": ...}
  """
  sources.check_dropout_model(model, allow_subclassed=True)
  if has_variation_head(model):
    raise validation.invalid(
        "model", "a model without a variation head (call "
        "`strip_variation_head` first to replace its head)",
        f"dual model {model.name!r}")
  base = model
  model, paths = functional_view(model)
  try:
    names = keras_graph.output_names(base)
  except ValueError as e:
    raise validation.invalid("model", "a model whose outputs are a tensor, "
                             "a list or a flat dict of tensors", str(e)) from e
  outputs = keras_graph.select_outputs(keras_graph.output_structure(model),
                                       names)
  layers = _check_layers_arg(layers)
  tap_selection.check_features(features)
  if not isinstance(hidden_units, (list, tuple)):
    raise validation.invalid("hidden_units",
                             "a list or tuple of positive integers",
                             hidden_units)
  hidden_units = [validation.check_int(u, "hidden_units", 1)
                  for u in hidden_units]
  validation.check_number(head_dropout, "head_dropout", "a rate in [0, 1)",
                          lambda v: 0 <= v < 1)
  if l2 is not None:
    validation.check_number(l2, "l2", "a number >= 0 (or None)",
                            lambda v: v >= 0)
  seed = validation.check_int(seed, "seed", 0)
  statistics = _resolve_statistics(model, names, outputs, statistic)
  taps = _resolve_taps(model, layers, features, paths)
  if prior not in PRIORS:
    raise validation.invalid("prior", f"one of {PRIORS}", prior)
  if prior == PRIOR_DELTA and include_delta is False:
    raise validation.invalid(
        "include_delta", 'True or "auto" with prior="delta" (that prior is '
        "the output-delta feature)", include_delta)
  if names is not None and (prior == PRIOR_MOMENTS or include_moments is
                            True):
    raise validation.invalid(
        "prior" if prior == PRIOR_MOMENTS else "include_moments",
        "no moment propagation on a model with several outputs (it "
        "propagates one output)", f"model {base.name!r} with outputs {names}")
  for arg, value in (("out_of_range", out_of_range),
                     ("shrink_out_of_range", shrink_out_of_range)):
    if not isinstance(value, bool):
      raise validation.invalid(arg, "True or False", value)

  probes = []
  layer_features = [tap_selection.probe_features(l, t.shape, features)
                    for l, t in taps]
  # Feature layers compute in float32 whatever the dtype policy: float16
  # sums of squares overflow on wide layers.
  for (layer, tensor), layer_set in zip(taps, layer_features):
    probe = probe_layers.ActivationStrength(
        features=layer_set,
        nonnegative=probe_layers.is_relu_output(layer),
        dtype="float32", name=PROBE_PREFIX + layer.name)
    probes.append(probe(tensor))
  # One signal for every head and the optional output; a tensor no output
  # depends on leaves the layer out of the dual.
  far = head_layers.OutOfRange(dtype="float32", name=OUT_OF_RANGE_NAME)(
      probes) if probes and (out_of_range or shrink_out_of_range) else None
  dual_outputs = {}
  for index, (output_name, prediction, output_statistic) in enumerate(
      zip(names or [None], outputs, statistics)):
    metadata = {
        "dropvar_tf_version": __version__,
        "num_samples": None,
        "dropout_rates": dropout_rates(base),
        "layers": [paths.get(id(l), l.name) for l, _ in taps],
        "features": features,
        "layer_features": layer_features,
        "include_prediction": bool(include_prediction),
        "transform": transform,
        "base_model": base.name,
    }
    if out_of_range:
      metadata["out_of_range"] = {"fitted": False}
    if output_name is not None:
      metadata.update(output=output_name, base_outputs=names,
                      base_output_dict=isinstance(
                          keras_graph.output_structure(base), dict))
    dual_outputs[contract.prediction_key(output_name)] = prediction
    dual_outputs[contract.variation_key(output_name)] = _output_head(
        model, prediction, probes, metadata, output_statistic,
        "" if output_name is None else f"_{index}",
        _head_name(index, output_name),
        dict(include_prediction=include_prediction,
             include_delta=include_delta, include_moments=include_moments,
             prior=prior, prior_bound=prior_bound, hidden_units=hidden_units,
             transform=transform, l2=l2, head_dropout=head_dropout,
             seed=seed, far=far if shrink_out_of_range else None))
  if out_of_range:
    dual_outputs[contract.OUT_OF_RANGE_KEY] = far
  return keras.Model(
      inputs=keras_graph.model_input(model), outputs=dual_outputs,
      name=name or f"{model.name}_dual")


def dropout_rates(model):
  """{path: rate} of every dropout source (`sources.dropout_sources`).

  What the head metadata lists under "dropout_rates".

  An RNN with both dropouts lists them as "<path>/dropout" and
  "<path>/recurrent_dropout".
  """
  found = sources.dropout_sources(model)
  paths = [f.path for f in found]
  return {(f.path if paths.count(f.path) == 1 else f"{f.path}/{f.kind}"):
          f.rate for f in found}


def _resolve_statistics(model, names, outputs, statistic):
  """One resolved statistic per output (a dict gives one per output name)."""
  wanted = validation.statistic_per_output(statistic, names, len(outputs))
  return [validation.resolve_statistic(
      stat, _output_units(out), keras_graph.output_is_probabilities(
          model, out)) for stat, out in zip(wanted, outputs)]


def _output_head(model, prediction, probes, metadata, statistic, suffix,
                 head_name, options):
  """Builds the head of one output; returns its variation tensor.

  Args:
    model: the Functional view of the base model.
    prediction: the output tensor the head estimates the DPV of.
    probes: the activation-strength feature tensors (shared by all heads).
    metadata: the head metadata so far; completed here.
    statistic: the resolved statistic of this output.
    suffix: appended to the names of this output's feature layers ("" for
      a single-output model, whose names stay as they always were).
    head_name: the name of the head sub-model.
    options: the `add_variation_head` arguments that shape the head.
  """
  o = options
  units = _output_units(prediction)
  prior = o["prior"]
  include_delta = o["include_delta"]
  head_inputs = list(probes)
  if o["include_prediction"]:
    head_inputs.append(
        head_layers.PredictionFeatures(
            probabilities=keras_graph.output_is_probabilities(
                model, prediction),
            dtype="float32", name=PREDICTION_FEATURES_NAME + suffix)(
                prediction))
  auto = prior == PRIOR_AUTO
  want_moments = True if prior == PRIOR_MOMENTS else o["include_moments"]
  moment_net = None
  if suffix and want_moments == "auto":
    warnings.warn("Moment-propagation features skipped: the model has "
                  "several outputs", stacklevel=3)
  elif not suffix:
    moment_net = _moment_features(model, want_moments, statistic)
  if auto:
    prior = PRIOR_DELTA if include_delta is not False else None
  want_delta = include_delta
  if prior == PRIOR_DELTA:
    want_delta = True if not auto or include_delta is True else "auto"
  delta, delta_value = _output_delta(model, prediction, want_delta, statistic,
                                     units, suffix,
                                     as_prior=prior == PRIOR_DELTA)
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
  metadata.update(
      statistic=statistic, include_delta=delta is not None,
      include_moments=moment_net is not None, prior=prior,
      prior_bound=None if prior is None else float(o["prior_bound"]))
  far = o["far"] if prior_value is not None else None
  metadata.update(shrink_out_of_range=far is not None)
  head = _build_head(head_inputs, o["hidden_units"],
                     _statistic_units(statistic, units), o["transform"],
                     o["l2"], o["head_dropout"], o["seed"], metadata,
                     prior_value, o["prior_bound"], head_name, far)
  if prior_value is not None:
    head_inputs = head_inputs + [prior_value]
  if far is not None:
    head_inputs = head_inputs + [far]
  return head(head_inputs)


def _build_head(feature_tensors, hidden_units, out_units, transform, l2,
                head_dropout, seed, metadata, prior=None, prior_bound=None,
                head_name=contract.HEAD_NAME, far=None):
  """The head model on the features, the prior and the out-of-range signal.

  Inputs in that order; the prior if there is one, the signal if the
  prior's correction shrinks with it.
  """
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
    return keras.Model(inputs, v, name=head_name)
  extra = [prior_input]
  if far is not None:
    extra.append(keras.Input(shape=far.shape[1:], dtype=far.dtype,
                             name="head_out_of_range"))
  v = head_layers.VariationOutput(
      out_units, transform=transform, metadata=metadata,
      prior_bound=float(prior_bound), shrink=far is not None,
      name="variation_output")([x] + extra)
  return keras.Model(inputs + extra, v, name=head_name)


def _heads(dual):
  """The head sub-models of `dual`, in output-name order.

  Raises:
    ValueError: `dual` was not made by `add_variation_head`.
  """
  if not isinstance(dual, keras.Model) or not has_variation_head(dual):
    raise validation.invalid(
        "dual", "a dual model made by `add_variation_head`",
        dual if not isinstance(dual, keras.Model) else
        f"model {dual.name!r} without a variation head")
  names = {l.name: l for l in dual.layers}
  if contract.HEAD_NAME in names:
    return [names[contract.HEAD_NAME]]
  found = []
  while _head_name(len(found), "") in names:
    found.append(names[_head_name(len(found), "")])
  return found


def variation_head(dual, output=None):
  """Returns the head sub-model of a dual model (of `output`'s, if several).

  Args:
    dual: a dual model made by `add_variation_head`.
    output: for a dual of a multi-output model, the output name (see
      `dual_output_names`); None for a single-output one.

  Raises:
    ValueError: `dual` was not made by `add_variation_head`, or `output`
      does not name one of its outputs.
  """
  variation_heads = _heads(dual)
  names = dual_output_names(dual)
  if names is None and output is None:
    return variation_heads[0]
  if names is None or output not in names:
    raise validation.invalid(
        "output", "None for a single-output dual model" if names is None
        else f"one of the dual model's output names {names}", output)
  return variation_heads[names.index(output)]


def variation_output_layer(dual, output=None):
  """Returns the `VariationOutput` layer of a dual model's head."""
  return variation_head(dual, output).get_layer("variation_output")


def variation_head_metadata(dual, output=None):
  """Returns what the head estimates, as a JSON-able dict.

  Keys: dropvar_tf_version, statistic, num_samples (of the MC targets it was
  fitted on; None before fitting), dropout_rates (`dropout_rates`), layers,
  features (the argument), layer_features (what each tapped layer's probe
  computes, "summary" or "neurons", in the order of layers),
  include_prediction, include_moments, transform, base_model,
  prior, prior_bound, and after fitting seed, num_train_examples,
  prior_noise_scale and prior_smoothed (the fitted noise scale of a
  smoothed output-delta prior and whether it stayed smoothed, else None),
  prior_correction_center (with shrink_out_of_range, else None),
  prior_explained and prior_silenced (the share of the variance of the
  targets' log the prior explained, and whether the fit silenced it; None
  without a prior: see `training.fit_variation_head`) and
  fit_report (the held-out
  self-assessment of `training.fit_variation_head`, see
  `metrics.fit_report`; None when fitted with `report_split=0`). A head of
  a multi-output model also has output (its output name), base_outputs
  (every output name) and base_output_dict (whether the base returns a
  dict). A dual made with `out_of_range=True` has out_of_range:
  {"fitted": False} before fitting, then what `fit_variation_head` set
  (see `training.fit_variation_head`); so has, after fitting, one whose
  prior's correction shrinks with that signal (shrink_out_of_range, also a
  key).

  Args:
    dual: a dual model made by `add_variation_head`.
    output: the output name for a multi-output dual (see `variation_head`).
  """
  return dict(variation_output_layer(dual, output).metadata)


def _layer_inputs(dual, layer, what):
  calls = keras_graph.graph_nodes(dual).get(id(layer), [])
  if len(calls) != 1:
    raise validation.invalid("dual", f"a dual model whose {what} is called "
                             "once", f"{len(calls)} calls in model "
                             f"{dual.name!r}")
  return calls[0][0]


def head_feature_tensors(dual, output=None):
  """Returns the symbolic tensors that feed a head, in head-input order."""
  return _layer_inputs(dual, variation_head(dual, output), "head")


def layer_input_tensors(dual, layer):
  """The symbolic tensors `layer` is called on in `dual` (called once)."""
  return _layer_inputs(dual, layer, f"layer {layer.name!r}")


def out_of_range_layer(dual):
  """The `head_layers.OutOfRange` layer of `dual`, or None without one.

  Raises:
    ValueError: `dual` was not made by `add_variation_head`.
  """
  _heads(dual)
  names = {l.name: l for l in dual.layers}
  return names.get(OUT_OF_RANGE_NAME)


def out_of_range_feature_tensors(dual):
  """The symbolic tensors that feed the out-of-range signal, in order.

  Raises:
    ValueError: `dual` has no head, or no out-of-range signal.
  """
  layer = out_of_range_layer(dual)
  if layer is None:
    raise validation.invalid(
        "dual", "a dual model made with `out_of_range=True` or with a "
        "prior that `shrink_out_of_range`", f"model {dual.name!r} without an "
        f"{contract.OUT_OF_RANGE_KEY!r} signal")
  return _layer_inputs(dual, layer, "out-of-range layer")


def prior_layer(dual, output=None):
  """The layer whose output is the head's prior, or None (no prior)."""
  out = variation_output_layer(dual, output)
  if out.prior_bound is None:
    return None
  return keras_graph.source_layer(
      head_feature_tensors(dual, output)[-2 if out.shrink else -1])


def smoothed_prior_layer(dual, output=None):
  """The smoothed `OutputDropoutDelta` that is the head's prior, or None."""
  layer = prior_layer(dual, output)
  if isinstance(layer, probe_layers.OutputDropoutDelta) and layer.smoothed:
    return layer
  return None


def head_variables(dual):
  """Every variable of `dual` that its base model does not use.

  The variation head's, its probes' (a delta prior's copy of the output
  kernel among them) and the out-of-range signal's: what
  `fit_variation_head` sets. [] for a model without a variation head.
  """
  if not has_variation_head(dual):
    return []
  base = {id(v) for v in strip_variation_head(dual).variables}
  return [v for v in dual.variables if id(v) not in base]


def strip_variation_head(dual):
  """Returns the plain model: the inverse of `add_variation_head`.

  The result is a Functional model with the dual model's inputs and the base
  prediction as its only output (for a multi-output base, its outputs in
  the base's structure: a dict keyed by output name, or a list in output
  order); it shares the base weights (no copy), so its predictions equal
  the dual's "prediction" outputs. A subclassed base comes back as the
  Functional view of its layers (`functional_view`).

  Raises:
    ValueError: `dual` has no variation head.
  """
  names = dual_output_names(dual)
  outputs = dual.output
  if names is None:
    prediction = outputs[contract.PREDICTION_KEY]
    meta = variation_head_metadata(dual)
  else:
    meta = variation_head_metadata(dual, names[0])
    prediction = [outputs[contract.prediction_key(n)] for n in names]
    if meta.get("base_output_dict"):
      prediction = dict(zip(names, prediction))
  base_name = meta.get("base_model") or dual.name
  return keras.Model(inputs=dual.input, outputs=prediction, name=base_name)
