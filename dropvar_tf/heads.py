"""Add a variation head to a trained Keras model, and take it off again.

`add_variation_head` taps the post-activation outputs of chosen hidden layers
of an existing Functional or Sequential model, turns them into activation-
strength features with probe layers, and feeds them (with the model's own
prediction) to a small head network. The returned dual model has outputs
`{"prediction": ..., "variation": ...}` and shares every base weight with the
input model; the input model itself is not modified.
"""

import warnings

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf import contract
from dropvar_tf import layers as probe_layers
from dropvar_tf import validation
from dropvar_tf.version import __version__

_ops = keras.ops

LOG = "log"
IDENTITY = "identity"
TRANSFORMS = (LOG, IDENTITY)

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


@keras.saving.register_keras_serializable(package="dropvar_tf")
class PredictionFeatures(keras.layers.Layer):
  """Features of the base model's prediction for the head.

  One output unit (regression, binary probability): `[y, y**2]`. Several
  class probabilities (`probabilities=True`): `[max p, sum(p * log p)]`, the
  top probability and minus the entropy. Several other outputs: `[max y,
  sum(y**2)]`. The full sorted probability vector (plus the top-two margin)
  fitted no better on digits (Spearman 0.946 against 0.947, R^2 0.934 against
  0.940, one run each) and its sort costs 5% of a 3x256 MLP's batch-256 pass
  on CPU; these two cost three ops.

  Input shape: (batch,) or (batch, k). Output shape: (batch, 2).

  Args:
    probabilities: the k > 1 inputs are probabilities (a softmax output).
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, probabilities=False, **kwargs):
    super().__init__(**kwargs)
    self.probabilities = bool(probabilities)

  def call(self, inputs):
    y = inputs
    if y.dtype != self.compute_dtype:
      y = _ops.cast(y, self.compute_dtype)
    if len(y.shape) == 1:
      y = _ops.expand_dims(y, -1)
    if y.shape[-1] == 1:
      return tf.concat([y, tf.square(y)], axis=-1)
    # xlogy(0, 0) = 0: no clipping needed for saturated probabilities.
    spread = tf.math.xlogy(y, y) if self.probabilities else tf.square(y)
    return tf.concat([tf.reduce_max(y, axis=-1, keepdims=True),
                      tf.reduce_sum(spread, axis=-1, keepdims=True)], axis=-1)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], 2)

  def get_config(self):
    config = super().get_config()
    config.update({"probabilities": self.probabilities})
    return config


@keras.saving.register_keras_serializable(package="dropvar_tf")
class LogFeature(keras.layers.Layer):
  """`log(x + offset)` of a non-negative feature, e.g. an analytic DPV.

  Negative inputs count as 0 (one relu op), unless `nonnegative` promises
  there are none (the delta feature is a norm), which saves that op.

  Input shape: (batch,) or (batch, d). Output shape: (batch, d) (d = 1 for
  rank-1 inputs).
  """

  def __init__(self, offset=1e-6, nonnegative=False, **kwargs):
    super().__init__(**kwargs)
    self.offset = float(offset)
    self.nonnegative = bool(nonnegative)

  def call(self, inputs):
    x = _ops.cast(inputs, self.compute_dtype)
    if len(x.shape) == 1:
      x = _ops.expand_dims(x, -1)
    if not self.nonnegative:
      x = _ops.relu(x)
    return _ops.log(x + self.offset)

  def compute_output_shape(self, input_shape):
    if len(input_shape) == 1:
      return (input_shape[0], 1)
    return tuple(input_shape)

  def get_config(self):
    config = super().get_config()
    config.update({"offset": self.offset, "nonnegative": self.nonnegative})
    return config


@keras.saving.register_keras_serializable(package="dropvar_tf")
class HeadInputDense(keras.layers.Layer):
  """The head's first layer: `act(concat(inputs) @ kernel + bias)`.

  Computed without concatenating wide inputs: each input at least
  `split_width` wide gets its own kernel block and matmul, the narrow ones
  are concatenated (cheap) and share one block, and the partial products are
  summed. On CPU this saves copying every tapped activation into one buffer
  on each request (`bench/dual_bench.py` measures the head's cost).

  Input: a list of (batch, d_i) tensors. Output: (batch, units).

  Args:
    units: output width.
    activation: "relu" or "linear".
    kernel_initializer, kernel_regularizer: as for `keras.layers.Dense`,
      applied to the whole (sum d_i, units) kernel.
    split_width: inputs at least this wide get their own matmul.
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, units, activation="relu",
               kernel_initializer="glorot_uniform", kernel_regularizer=None,
               split_width=32, **kwargs):
    super().__init__(**kwargs)
    self.units = validation.check_int(units, "units", 1)
    if activation not in ("relu", "linear"):
      raise validation.invalid("activation", "'relu' or 'linear'", activation)
    self.activation = activation
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    self.split_width = validation.check_int(split_width, "split_width", 1)

  def build(self, input_shape):
    if not (isinstance(input_shape, (list, tuple)) and input_shape and
            isinstance(input_shape[0], (list, tuple))):
      input_shape = [input_shape]
    widths = [int(shape[-1]) for shape in input_shape]
    wide = [i for i, d in enumerate(widths) if d >= self.split_width]
    narrow = [i for i, d in enumerate(widths) if d < self.split_width]
    # Blocks: (input indices, rows of the full kernel), wide inputs first.
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    self._blocks = [[i] for i in wide] + ([narrow] if narrow else [])
    self._block_rows = [np.concatenate([np.arange(offsets[i], offsets[i + 1])
                                        for i in block])
                        for block in self._blocks]
    self._num_inputs = len(widths)
    self.kernels = [
        self.add_weight(name=f"kernel_{b}", shape=(len(rows), self.units),
                        initializer="zeros",
                        regularizer=self.kernel_regularizer)
        for b, rows in enumerate(self._block_rows)]
    self.bias = self.add_weight(name="bias", shape=(self.units,),
                                initializer="zeros")
    self.set_full_kernel(
        self.kernel_initializer((int(offsets[-1]), self.units)))

  def full_kernel(self):
    """The (sum d_i, units) kernel as one numpy array, rows in input order."""
    rows = np.concatenate(self._block_rows)
    full = np.zeros((len(rows), self.units), "float32")
    full[rows] = np.concatenate([k.numpy() for k in self.kernels])
    return full

  def set_full_kernel(self, kernel):
    """Sets the kernel blocks from a (sum d_i, units) array."""
    kernel = np.asarray(kernel, "float32")
    for var, rows in zip(self.kernels, self._block_rows):
      var.assign(kernel[rows])

  def call(self, inputs):
    if not isinstance(inputs, (list, tuple)):
      inputs = [inputs]
    if len(inputs) != self._num_inputs:
      raise validation.invalid("inputs", f"a list of {self._num_inputs} "
                               "feature tensors", f"{len(inputs)} tensors")
    products = []
    for block, kernel in zip(self._blocks, self.kernels):
      parts = [inputs[i] for i in block]
      x = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
      products.append(tf.matmul(tf.cast(x, kernel.dtype), kernel))
    # One AddN op however many blocks.
    out = products[0] if len(products) == 1 else tf.add_n(products)
    out = tf.nn.bias_add(out, self.bias)
    return tf.nn.relu(out) if self.activation == "relu" else out

  def compute_output_shape(self, input_shape):
    first = input_shape[0] if isinstance(input_shape, list) else input_shape
    return (first[0], self.units)

  def get_config(self):
    config = super().get_config()
    config.update({
        "units": self.units, "activation": self.activation,
        "kernel_initializer": keras.initializers.serialize(
            self.kernel_initializer),
        "kernel_regularizer": keras.regularizers.serialize(
            self.kernel_regularizer),
        "split_width": self.split_width})
    return config


# The oldest version whose heads compute their features as this one does
# (0.2.0: L2 norm instead of RMS in summaries, [max p, sum p log p] as the
# prediction features, the first layer split per input).
HEAD_FORMAT_VERSION = "0.2.0"


def _version_tuple(text):
  return tuple(int(part) for part in str(text).split(".")[:3])


def _check_head_format(saved_version):
  """Refuses a head saved by a version that computed other features."""
  if saved_version is None:
    return
  try:
    old = _version_tuple(saved_version) < _version_tuple(HEAD_FORMAT_VERSION)
  except ValueError:
    old = False  # a development version string: trust it
  if old:
    raise validation.invalid(
        "metadata", f"a head made by dropvar_tf >= {HEAD_FORMAT_VERSION} "
        "(earlier heads computed their input features differently; refit "
        "the head, e.g. with `train_variation_head`, on this version)",
        f"dropvar_tf_version={saved_version!r}")


@keras.saving.register_keras_serializable(package="dropvar_tf")
class VariationOutput(keras.layers.Layer):
  """Maps the head's raw output to a non-negative variation estimate.

  With `transform="log"` the head is trained on `log(dpv + eps)` and this
  layer returns `min(scale * max(exp(z) - eps, 0), max_value)`; with
  "identity", `min(scale * max(z, 0), max_value)`. `eps`, `scale` and
  `max_value` are non-trainable weights set by `fit_variation_head` (so they
  are saved with the model and never baked into a traced graph).

  Args:
    units: number of estimated statistics (1 gives output shape (batch,)).
    transform: "log" or "identity".
    metadata: JSON-able dict describing what the head estimates; kept in the
      config so it survives saving (see `variation_head_metadata`).
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, units=1, transform=LOG, metadata=None, **kwargs):
    super().__init__(**kwargs)
    if transform not in TRANSFORMS:
      raise validation.invalid("transform", f"one of {TRANSFORMS}", transform)
    self.units = validation.check_int(units, "units", 1)
    self.transform = transform
    self.metadata = dict(metadata or {})
    _check_head_format(self.metadata.get("dropvar_tf_version"))
    self.eps = self.add_weight(name="eps", shape=(), trainable=False,
                               initializer=keras.initializers.Constant(1e-3))
    self.scale = self.add_weight(name="scale", shape=(), trainable=False,
                                 initializer="ones")
    # Upper bound on the estimate: a head meeting inputs unlike any it was
    # fitted on must not extrapolate exp() to absurd values.
    self.max_value = self.add_weight(
        name="max_value", shape=(), trainable=False,
        initializer=keras.initializers.Constant(3.4e38))

  def call(self, inputs):
    z = inputs
    if z.dtype != "float32":
      z = _ops.cast(z, "float32")
    if self.transform == LOG:
      # exp may overflow to inf: the cap below turns it into max_value.
      v = _ops.exp(z) - self.eps
    else:
      v = z
    v = _ops.minimum(self.scale * _ops.relu(v), self.max_value)
    if self.units == 1:
      v = _ops.squeeze(v, axis=-1)
    return v

  def compute_output_shape(self, input_shape):
    if self.units == 1:
      return tuple(input_shape[:-1])
    return tuple(input_shape)

  def to_raw(self, variation):
    """Numpy inverse of the output transform, for building training targets."""
    v = np.asarray(variation, "float64") / float(self.scale.numpy())
    if self.transform == LOG:
      return np.log(v + float(self.eps.numpy()))
    return v

  def get_config(self):
    config = super().get_config()
    config.update({"units": self.units, "transform": self.transform,
                   "metadata": self.metadata})
    return config


def _check_layers_arg(layers):
  if isinstance(layers, str):
    if layers in ("all", "last"):
      return layers
    return [layers]
  if isinstance(layers, (list, tuple)) and layers and all(
      isinstance(n, str) for n in layers):
    return list(layers)
  raise validation.invalid(
      "layers", '"all", "last", or a non-empty list of layer names', layers)


def _source_layer(tensor):
  return tensor._keras_history.operation  # pylint: disable=protected-access


def _graph_nodes(model):
  """Maps id(layer) -> list of (input_tensors, output_tensors) in `model`.

  Walks back from the model's outputs, so calls of the same layer objects in
  other graphs (e.g. clones that reuse them) are not counted.
  """
  nodes, seen, stack = {}, set(), list(model.outputs)
  while stack:
    tensor = stack.pop()
    history = tensor._keras_history  # pylint: disable=protected-access
    key = (id(history.operation), history.node_index)
    if key in seen:
      continue
    seen.add(key)
    node = history.operation._inbound_nodes[history.node_index]  # pylint: disable=protected-access
    nodes.setdefault(id(history.operation), []).append(
        (list(node.input_tensors), list(node.output_tensors)))
    stack.extend(node.input_tensors)
  return nodes


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
  validation.check_model(model, require_dropout=False)
  nodes = _graph_nodes(model)
  output_ops = {id(_source_layer(t)) for t in model.outputs}
  feeds_dropout = set()
  for layer in model.layers:
    if isinstance(layer, keras.layers.Dropout):
      for inputs, _ in nodes.get(id(layer), []):
        feeds_dropout.update(id(_source_layer(t)) for t in inputs)
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
  if type(layer) is keras.layers.ReLU:  # pylint: disable=unidiomatic-typecheck
    return (not layer.negative_slope and float(layer.threshold) >= 0 and
            (layer.max_value is None or float(layer.max_value) >= 0))
  if type(layer) not in _ENDS_IN_ACTIVATION:  # subclasses may differ
    return False
  return layer.activation in (keras.activations.relu,
                              keras.activations.relu6)


def _resolve_taps(model, layers):
  """Returns [(layer, output tensor in `model`'s graph)] to tap."""
  candidates = candidate_layers(model)
  if layers == "all":
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
  nodes = _graph_nodes(model)
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
  """Returns an `OutputDropoutDelta` feature tensor, or None."""
  if not include_delta:
    return None
  out = model.outputs[0]
  layer = _source_layer(out)
  nodes = _graph_nodes(model)
  why = None
  activation = getattr(getattr(layer, "activation", None), "__name__", None)
  if not isinstance(layer, keras.layers.Dense):
    why = f"the output layer {layer.name!r} is not Dense"
  elif activation not in probe_layers._OUTPUT_ACTIVATIONS:  # pylint: disable=protected-access
    why = f"output activation {activation!r} is not linear/sigmoid/softmax"
  else:
    dropped = nodes[id(layer)][0][0][0]
    dropout = _source_layer(dropped)
    if (not isinstance(dropout, keras.layers.Dropout) or
        dropout.noise_shape is not None or len(dropped.shape) != 2):
      why = f"the input of {layer.name!r} does not come from a plain Dropout"
  if why:
    if include_delta == "auto":
      return None
    raise validation.invalid("include_delta", "a model whose output is a "
                             "Dense layer right after a Dropout layer", why)
  h = nodes[id(dropout)][0][0][0]
  delta = probe_layers.OutputDropoutDelta(
      rate=dropout.rate, activation=activation, statistic=statistic,
      input_dim=int(h.shape[-1]), units=units, dtype="float32",
      name=DELTA_NAME)
  value = delta([h, out])
  delta.kernel.assign(layer.kernel.numpy())
  return LogFeature(nonnegative=True, dtype="float32",
                    name=DELTA_NAME + "_log")(value)


def _moment_features(model, include_moments, statistic):
  """Returns a moment-propagation model, or None (with a warning on "auto")."""
  if not include_moments:
    return None
  try:
    from dropvar_tf import moments  # pylint: disable=import-outside-toplevel
    return moments.moment_model(model, statistic=statistic)
  except (ImportError, ValueError) as e:
    if include_moments == "auto":
      warnings.warn(f"Moment-propagation features skipped: {e}")
      return None
    raise


def add_variation_head(model, layers="all", features=probe_layers.SUMMARY,
                       hidden_units=(16, 64), statistic=contract.STAT_AUTO,
                       include_prediction=True, include_delta="auto",
                       include_moments=False,
                       transform=LOG, l2=1e-4, head_dropout=0.0, seed=0,
                       name=None):
  """Returns a dual model with outputs {"prediction", "variation"}.

  Like `tfmot.quantization.keras.quantize_model`, it takes an existing model
  and returns a transformed one. Side effects: none on `model`. The dual model
  reuses `model`'s layers, so weights are shared (not copied): training the
  base afterwards changes both; the one exception is the output-delta
  feature (`include_delta`), which keeps a copy of the output layer's kernel
  taken now, so add the head after the base is trained. The dual model is not compiled; train its head
  with `fit_variation_head`, which leaves the base weights untouched. Nested
  sub-models are tapped as a whole (their inner layers are not reachable).

  Args:
    model: a built, trained Functional or Sequential `keras.Model` with at
      least one Dropout layer and one output tensor. Subclassed models are
      refused (they have no symbolic graph to tap).
    layers: "all" (every candidate hidden layer, see `candidate_layers`),
      "last" (the candidate closest to the output), or a list of layer names.
    features: "summary" (mean, L2 norm and fraction active per layer; default:
      as good as or better than per-neuron features on every task measured
      and steadier from fit to fit) or "neurons" (per-neuron activations;
      the cheaper of the two on conv feature maps, which summaries read
      four times: `bench/dual_bench.py --model=cnn`).
    hidden_units: widths of the head's hidden ReLU layers. The default
      (16, 64) starts narrow: the first layer, the only one as wide as the
      features, stays cheap (about 10% of a 3x256 MLP's multiply-adds).
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

  Returns:
    A `keras.Model` with the inputs of `model` and dict outputs
    {"prediction": model's output, "variation": (batch,) or (batch, k)}.

  Raises:
    ValueError: invalid `model` (None, not Keras, subclassed, unbuilt, no
      Dropout, several outputs, already has a head) or invalid arguments,
      e.g. unknown layer names.

  Example:
  >>> dual = add_variation_head(model, layers="all")
  >>> out = dual.predict(x)   # {"prediction": ..., "variation": ...}
  """
  validation.check_model(model)
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
  probe_layers._check_features(features)  # pylint: disable=protected-access
  if not isinstance(hidden_units, (list, tuple)):
    raise validation.invalid("hidden_units",
                             "a list or tuple of positive integers",
                             hidden_units)
  hidden_units = [validation.check_int(u, "hidden_units", 1)
                  for u in hidden_units]
  units = _output_units(model)
  probabilities = validation.output_is_probabilities(model)
  statistic = validation.resolve_statistic(statistic, units, probabilities)
  taps = _resolve_taps(model, layers)

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
        PredictionFeatures(probabilities=probabilities,
                           dtype="float32",
                           name=PREDICTION_FEATURES_NAME)(prediction))
  delta = _output_delta(model, include_delta, statistic, units)
  if delta is not None:
    head_inputs.append(delta)
  moment_net = _moment_features(model, include_moments, statistic)
  if moment_net is not None:
    head_inputs.append(
        LogFeature(dtype="float32", name=MOMENTS_NAME)(
            moment_net(validation.model_input(model))))

  metadata = {
      "dropvar_tf_version": __version__,
      "statistic": statistic,
      "num_samples": None,
      "dropout_rates": {l.name: float(l.rate)
                        for l in validation.dropout_layers(model)},
      "layers": [l.name for l, _ in taps],
      "features": features,
      "include_prediction": bool(include_prediction),
      "include_delta": delta is not None,
      "include_moments": moment_net is not None,
      "transform": transform,
      "base_model": model.name,
  }
  head = _build_head(head_inputs, hidden_units,
                     _statistic_units(statistic, units), transform, l2,
                     head_dropout, seed, metadata)
  variation = head(head_inputs)
  return keras.Model(
      inputs=validation.model_input(model),
      outputs={contract.PREDICTION_KEY: prediction,
               contract.VARIATION_KEY: variation},
      name=name or f"{model.name}_dual")


def _build_head(feature_tensors, hidden_units, out_units, transform, l2,
                head_dropout, seed, metadata):
  inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype,
                        name=f"head_in_{i}")
            for i, t in enumerate(feature_tensors)]
  # No Normalization layer: `fit_variation_head` trains on standardised
  # features and folds the standardisation into the first layer, which
  # saves its element-wise ops on every served request.
  reg = keras.regularizers.L2(l2) if l2 else None
  x = HeadInputDense(
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
  v = VariationOutput(out_units, transform=transform, metadata=metadata,
                      name="variation_output")(x)
  return keras.Model(inputs, v, name=contract.HEAD_NAME)


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
  include_prediction, include_moments, transform, base_model, and after
  fitting seed and num_train_examples.
  """
  return dict(variation_output_layer(dual).metadata)


def head_feature_tensors(dual):
  """Returns the symbolic tensors that feed the head, in head-input order."""
  head = variation_head(dual)
  calls = _graph_nodes(dual).get(id(head), [])
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
