"""Analytic single-shot DPV estimate by moment propagation (no training).

A training-free baseline for the variation head: the mean and variance of
every unit are pushed through the network once, with each Dropout layer
treated as a random Bernoulli multiplier, and the variance of the output gives
the estimated dropout prediction variation (DPV).

Approximations (all standard for moment propagation; say them in reports):
- Units are independent: covariances between units are dropped after every
  layer. Dense/Conv then propagate `var_out = var_in @ kernel**2`.
- Pre-activations are Gaussian (mean, variance) when an activation is applied.
  ReLU uses the exact moments of a rectified Gaussian. Sigmoid uses the probit
  approximation `E[sigmoid(z)] ~ sigmoid(mu / sqrt(1 + pi * var / 8))` for
  the mean and 20-point Gauss-Hermite quadrature for the variance (smooth,
  bounded by 1/4, right in the tails where the delta method with a probit
  surrogate is far off). Tanh is `2 sigmoid(2z) - 1`.
  Softmax: class k is `sigmoid(z_k - logsumexp_{j != k} z_j)`; the margin's
  variance comes from linearising the logsumexp (its gradient is the softmax of
  the other mean logits), then the sigmoid rule above applies. For small
  variances this is the delta method with the softmax Jacobian; unlike it, the
  variance stays bounded. Memory is O(k^2) per example for k classes. The mean
  class probabilities are renormalised to sum to one.
  Every other element-wise activation (gelu, silu, elu, softplus, leaky_relu,
  ...) uses 20-point Gauss-Hermite quadrature of E[f(z)] and Var[f(z)].
- Max pooling: the max of the Gaussians in a window, folded pairwise with
  Clark's (1961) moment matching (the max of two Gaussians is treated as a
  Gaussian). Average pooling is exact under independence.
- Of the dropout sources (`sources.dropout_sources`) only `Dropout` is
  modelled; every other source (attention, RNN, Gaussian, Alpha, registered
  dropout, Dropout subclasses) is refused by name, never ignored.
- Dropout masks must be independent per unit: SpatialDropout and Dropout with
  a `noise_shape` are refused (with the correlation they create dropped, the
  estimate ranks examples poorly against MC dropout; docs/measurements.md).
- A merge's (Add, Subtract, Average, Multiply) inputs are independent. A
  residual branch correlated with its shortcut is this approximation; one
  tensor that varies under dropout entering a merge twice (`Subtract([d, d])`
  is 0, not random) is refused by name.
- Overlapping pooling windows (stride < pool size) share inputs; the dropped
  correlation makes a later average underestimate the std
  (docs/measurements.md).
- BatchNormalization runs in inference mode (an affine map with the moving
  statistics), as in a dropout-only MC pass.

The rules live in `moment_rules`, the layers that apply them in
`moment_layers`; this module builds the moment model from a base model's graph.

Statistics follow `dropvar_tf.contract`: for "predicted_class_std" the class is
the one the deterministic pass (dropout off) predicts; the moment model carries
the deterministic activations beside the moments for that reason.

Example:

```python
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, "relu"),
                          keras.layers.Dropout(0.2), keras.layers.Dense(1)])
dpv = moment_propagation_variation(model, x)  # (N,) estimated std
mp = moment_model(model)                      # keras.Model, same inputs
```
"""

import numpy as np

from dropvar_tf import inputs as inputs_lib
from dropvar_tf import keras_graph
from dropvar_tf import moment_layers
from dropvar_tf import moment_rules
from dropvar_tf import sources
from dropvar_tf import validation
from dropvar_tf._keras import keras

# Activations that are not element-wise: no moment rule applies.
_NON_ELEMENTWISE = ("log_softmax", "glu", "sparsemax")

_SUPPORTED_KINDS = (
    "InputLayer", "Dropout (without noise_shape)",
    "Dense (any element-wise activation, softmax)", "Activation", "ReLU",
    "LeakyReLU", "ELU", "Softmax (last axis)", "BatchNormalization",
    "Embedding", "Conv1D", "Conv2D", "Conv3D", "MaxPooling1D/2D/3D",
    "AveragePooling1D/2D/3D", "GlobalAveragePooling1D/2D/3D", "Flatten",
    "Reshape", "Permute", "RepeatVector", "Concatenate", "Identity",
    "ZeroPadding1D/2D/3D", "Cropping1D/2D/3D", "Add", "Subtract", "Average",
    "Multiply", "nested Sequential/Functional models")


def _check_activation(activation, where):
  name = moment_rules.activation_name(activation)
  if name in _NON_ELEMENTWISE:
    raise validation.invalid(
        "model", "a model whose activations are element-wise or softmax "
        "(moment propagation has no rule for others)",
        f"activation {name!r} in {where}")


# ---------------------------------------------------------------------------
# Building the moment model from the base model's graph.
# ---------------------------------------------------------------------------

_POOLING = (moment_layers.GLOBAL_AVERAGE_POOLING +
            moment_layers.AVERAGE_POOLING +
            (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
             keras.layers.MaxPooling3D))
_SPATIAL_DROPOUT = (keras.layers.SpatialDropout1D,
                    keras.layers.SpatialDropout2D,
                    keras.layers.SpatialDropout3D)
_REARRANGE = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
              keras.layers.RepeatVector, keras.layers.Concatenate,
              keras.layers.Identity, keras.layers.ZeroPadding1D,
              keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
              keras.layers.Cropping1D, keras.layers.Cropping2D,
              keras.layers.Cropping3D)
_MERGE = {keras.layers.Add: "add", keras.layers.Subtract: "subtract",
          keras.layers.Average: "average", keras.layers.Multiply: "multiply"}
_CONV = {keras.layers.Conv1D: 1, keras.layers.Conv2D: 2, keras.layers.Conv3D: 3}


def _unsupported(layer, why=""):
  held = sources.layer_sources(layer)
  if held:
    # MC dropout samples this source; moment propagation has no rule for it
    # and must not treat it as deterministic: say so.
    why += (" (of the dropout sources, moment propagation models only "
            "`Dropout` without noise_shape; this layer is or holds "
            f"{', '.join(sorted({f.kind for f in held}))})")
  return validation.invalid(
      "model",
      "a model made only of layers that moment propagation supports: "
      + ", ".join(_SUPPORTED_KINDS) + why,
      f"layer {layer.name!r} of class {_class_text(layer)}")


def _class_text(layer):
  """The class of `layer` for messages; a Keras op says it is not a layer.

  `h + 1.0` on a Keras tensor makes an op node (`keras.ops` class `Add`),
  which must not read as the supported `Add` layer.
  """
  cls = type(layer)
  if isinstance(layer, keras.layers.Layer):
    return cls.__name__
  return (f"{cls.__name__} (the op of an expression on Keras tensors, in "
          f"{cls.__module__}; write it as a layer)")


def _plain_variable(layer, name):
  """Returns the layer's variable `name`, refusing quantized or LoRA layers."""
  if getattr(layer, "quantization_mode", None) is not None or getattr(
      layer, "lora_enabled", False):
    raise _unsupported(layer, " (without quantization or LoRA)")
  variable = getattr(layer, name)
  if variable is not None and not isinstance(variable, keras.Variable):
    raise _unsupported(layer, f" (with a plain `{name}` variable)")
  return variable


def _make_moment_layer(layer, name):
  """Returns the moment layer for one base layer (variables shared)."""
  kind = type(layer)
  if kind in _SPATIAL_DROPOUT or (kind is keras.layers.Dropout and
                                  layer.noise_shape is not None):
    # A shared mask correlates whole feature maps; with that correlation
    # dropped the estimate ranks examples poorly (docs/measurements.md):
    # refuse, do not mislead.
    raise _unsupported(
        layer, " (dropout masks shared across units, as SpatialDropout or "
        "noise_shape make them, break the independence assumption)")
  if kind is keras.layers.Dropout:
    return moment_layers.MomentDropout(layer.rate, name=name)
  if kind is keras.layers.Dense:
    _check_activation(layer.activation, layer.name)
    return moment_layers.MomentDense(
        layer.units, layer.activation, layer.use_bias, name=name).share_from({
            "kernel": _plain_variable(layer, "kernel"), "bias": layer.bias})
  if kind in _CONV:
    _check_activation(layer.activation, layer.name)
    return moment_layers.MomentConv(
        _CONV[kind], layer.filters, layer.kernel_size, layer.strides,
        layer.padding, layer.data_format, layer.dilation_rate, layer.groups,
        layer.activation, layer.use_bias, name=name).share_from({
            "kernel": _plain_variable(layer, "kernel"), "bias": layer.bias})
  if kind is keras.layers.BatchNormalization:
    return moment_layers.MomentBatchNormalization(
        layer.axis, layer.epsilon, layer.center, layer.scale,
        name=name).share_from({
            "gamma": layer.gamma, "beta": layer.beta,
            "moving_mean": layer.moving_mean,
            "moving_variance": layer.moving_variance})
  if kind is keras.layers.Embedding:
    return moment_layers.MomentEmbedding(
        layer.input_dim, layer.output_dim, name=name).share_from(
            {"embeddings": _plain_variable(layer, "embeddings")})
  if kind is keras.layers.Activation:
    _check_activation(layer.activation, layer.name)
    return moment_layers.MomentActivation(layer.activation, name=name)
  if kind is keras.layers.Softmax:
    if layer.axis != -1:
      raise _unsupported(layer, " (Softmax on the last axis, axis=-1)")
    return moment_layers.MomentActivation("softmax", name=name)
  if kind is keras.layers.ReLU:
    if (layer.max_value is None and not layer.negative_slope and
        not layer.threshold):
      return moment_layers.MomentActivation("relu", name=name)
    return moment_layers.MomentElementwise(layer, name=name)
  if kind in (keras.layers.LeakyReLU, keras.layers.ELU):
    return moment_layers.MomentElementwise(layer, name=name)
  if kind in _POOLING:
    return moment_layers.MomentPooling(layer, name=name)
  if kind in _REARRANGE:
    return moment_layers.MomentRearrange(layer, name=name)
  if kind in _MERGE:
    return moment_layers.MomentMerge(_MERGE[kind], name=name)
  raise _unsupported(layer)


class _Moments:
  """Symbolic (det, mean, var) of one base tensor; a leaf for `keras.tree`.

  `random`: whether a Dropout layer lies upstream (the tensor varies).
  """

  __slots__ = ("det", "mean", "var", "random")

  def __init__(self, det, mean, var, random=False):
    self.det, self.mean, self.var = det, mean, var
    self.random = random

  def as_list(self):
    return [self.det, self.mean, self.var]


class _GraphWalker:
  """Re-runs a base model's graph, calling moment layers instead of layers.

  One moment layer per base layer (a shared base layer gives a shared moment
  layer); nested models are walked recursively, so the result is flat.
  """

  def __init__(self):
    self._layers = {}
    self._names = set()

  def _moment_layer(self, layer):
    if id(layer) not in self._layers:
      name, i = f"{layer.name}_moments", 1
      while name in self._names:
        name, i = f"{layer.name}_moments_{i}", i + 1
      self._names.add(name)
      self._layers[id(layer)] = _make_moment_layer(layer, name)
    return self._layers[id(layer)]

  def call(self, layer, *args, **kwargs):
    """Propagates moments through one call of `layer` (a graph node)."""
    if isinstance(layer, keras.Model):
      return self.run(layer, args[0])
    moments_kwargs = [k for k, v in kwargs.items() if isinstance(v, _Moments)]
    if len(args) != 1 or moments_kwargs:
      raise _unsupported(layer, " (called on a single tensor or a list)")
    inputs = args[0]
    if isinstance(inputs, (list, tuple)):
      if type(layer) not in _MERGE and type(layer) is not (
          keras.layers.Concatenate):
        raise _unsupported(layer, " (only merge layers take a list)")
      repeated = [m for i, m in enumerate(inputs)
                  if any(m is other for other in inputs[:i])]
      if type(layer) in _MERGE and any(m.random for m in repeated):
        raise _unsupported(
            layer, " (no merge that takes one tensor varying under dropout "
            "twice: it is perfectly correlated with itself, while moment "
            "propagation takes a merge's inputs as independent)")
      outputs = self._moment_layer(layer)([m.as_list() for m in inputs])
      random = any(m.random for m in inputs)
    elif isinstance(layer, keras.layers.InputLayer):
      return inputs
    else:
      outputs = self._moment_layer(layer)(inputs.as_list())
      random = inputs.random or isinstance(layer, keras.layers.Dropout)
    return _Moments(*outputs, random=random)

  def run(self, model, inputs):
    """Propagates moments through `model` given moments of its inputs."""
    if not keras_graph.is_graph_model(model):
      raise validation.invalid(
          "model", "Functional or Sequential models (also when nested)",
          f"subclassed model {model.name!r} of type {type(model).__name__}")
    if isinstance(model, keras.Sequential):
      flat = keras.tree.flatten(inputs)
      if len(flat) != 1:
        raise validation.invalid("model", "a Sequential model with one input",
                                 f"{len(flat)} inputs to {model.name!r}")
      x = flat[0]
      for layer in model.layers:
        x = self.call(layer, x)
      return x
    return keras_graph.run_through_graph(
        model, keras.tree.flatten(inputs), self.call)


def moment_model(model, statistic="auto"):
  """Builds a Keras model that estimates DPV analytically in one pass.

  The returned model has the same inputs as `model` (one array or named dict
  inputs) and outputs the estimated dropout prediction variation, propagated
  mean and variance with every Dropout layer as a Bernoulli multiplier (see the
  module docstring for the approximations). It is made of registered,
  serializable `dropvar_tf` layers that share (not copy) the variables of
  `model`, so it can be nested in another Functional model next to `model`,
  saved as `.keras` (after loading, the moment layers hold copies with the
  same values) and exported with `keras.export.ExportArchive`.

  `model` is not changed: its variables are only read (through
  `stop_gradient`), and the moment layers are not trainable and never change
  `variable.trainable`. Compile state is irrelevant; nothing is compiled.

  Args:
    model: a built Functional or Sequential model with at least one Dropout
      layer and one output of shape (N, k). Nested Functional/Sequential
      models are walked.
    statistic: "std" (per output unit: (N,) for k = 1, else (N, k)),
      "predicted_class_std" ((N,): the std of the probability of the class
      the deterministic pass predicts), "per_class_std" ((N, k)) or "auto"
      ("std" for k = 1, else "predicted_class_std").

  Returns:
    A `keras.Model` named `<model.name>_moments`.

  Raises:
    ValueError: `model` is not a supported model (see `check_model`), has an
      unsupported layer (the message names it, its class and the supported
      kinds), more than one output, or an output that is not (N, k);
      `statistic` is not one of `dropvar_tf.contract.STATISTICS`.

  Example:

  ```python
  mp = moment_model(model)
  dual = keras.Model(model.input, {"prediction": model.output,
                                   "mp": mp(model.input)})
  ```
  """
  sources.check_dropout_model(model)
  outputs = model.outputs
  if len(outputs) != 1 or len(outputs[0].shape) != 2:
    raise validation.invalid(
        "model", "a model with one output of shape (batch, k)",
        f"outputs of shapes {[tuple(o.shape) for o in outputs]}")
  statistic = validation.resolve_statistic(
      statistic, outputs[0].shape[-1],
      keras_graph.output_is_probabilities(model))
  structure = keras_graph.model_input(model)
  inputs = keras.tree.map_structure(
      lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name),
      structure)
  walker = _GraphWalker()
  start = keras.tree.map_structure(
      lambda t: _Moments(*moment_layers.MomentInput(
          name=f"{t.name}_moments_input")(t)),
      inputs)
  out = walker.run(model, start)
  out = keras.tree.flatten(out)[0]
  dpv = moment_layers.MomentStatistic(statistic, name="dpv")(out.as_list())
  result = keras.Model(inputs, dpv, name=f"{model.name}_moments")
  # Nothing here is trained; this also keeps the shared base variables out of
  # `result.trainable_weights` (their own `trainable` flags stay untouched).
  result.trainable = False
  return result


def moment_propagation_variation(model, x, statistic="auto", batch_size=1024):
  """Estimates DPV of `x` analytically (one pass, no sampling, no training).

  Args:
    model: the base model (see `moment_model`); not changed.
    x: inputs as `model` takes them, in any form every other step reads
      (`inputs.normalize`: arrays, dicts, tf.data; docs/inputs.md).
    statistic: see `moment_model`.
    batch_size: examples per forward pass, an integer >= 1.

  Returns:
    A float32 numpy array: (N,) for "predicted_class_std" and for "std" with
    one output unit, (N, k) otherwise.

  Raises:
    ValueError: for the reasons `moment_model` gives, a bad `batch_size`,
      or inputs `x` the model does not take (or with NaN/Inf), named `x`.
  """
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  mp = moment_model(model, statistic)
  data = inputs_lib.normalize(model, x)
  return np.asarray(mp.predict(data.as_dataset(batch_size), verbose=0))
