"""The moment layers: Keras layers that propagate moments, one per layer kind.

Every moment layer maps [det, mean, var] to [det, mean, var]: `det` is the
deterministic (dropout off) activation, `mean` and `var` the moments, in
float32. `dropvar_tf.moments.moment_model` builds a model of them from a base
model's graph (its docstring states the approximations); layers with
variables share those of the base layer (`share_from`). They are registered
as "dropvar_tf>ClassName", so a model holding them saves as `.keras`.
"""

import itertools

import numpy as np

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import moment_rules
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_PACKAGE = "dropvar_tf"

# Pooling layers `MomentPooling` treats as averages (exact under
# independence); it treats the other pooling layers as max pooling.
GLOBAL_AVERAGE_POOLING = (keras.layers.GlobalAveragePooling1D,
                          keras.layers.GlobalAveragePooling2D,
                          keras.layers.GlobalAveragePooling3D)
AVERAGE_POOLING = (keras.layers.AveragePooling1D,
                   keras.layers.AveragePooling2D,
                   keras.layers.AveragePooling3D)


def _f32(x):
  return tf.cast(x, tf.float32)


class _MomentLayer(keras.layers.Layer):
  """Base of the moment layers: variables shared with a base layer.

  A layer given `share_from({name: base_variable})` before it is built reuses
  those variables (same objects, never assigned). They are read through
  `stop_gradient`, and kept out of this layer's trainable list, so neither
  training nor `layer.trainable = ...` on this layer can touch the base model.
  A layer made from its config (after `.keras` loading) creates its own
  variables, which `load_own_variables` fills with the saved values.
  """

  def __init__(self, **kwargs):
    kwargs.setdefault("trainable", False)
    super().__init__(**kwargs)
    keras_graph.set_untracked_attribute(self, "_shared_variables", None)

  def _variable_shapes(self, input_shape):
    """Returns {name: shape or None} for the variables, in saving order."""
    del input_shape
    return {}

  def share_from(self, variables):
    """Makes the layer reuse `variables` when it is built; returns the layer.

    Args:
      variables: {name: variable of the base layer}, one per name in
        `_variable_shapes` (None for an absent bias). Call before the layer
        is built; the variables are never assigned.
    """
    # Untracked: tracking would flip `variable.trainable` of the base
    # model's variables when this layer is not trainable.
    keras_graph.set_untracked_attribute(self, "_shared_variables",
                                        dict(variables))
    return self

  def build(self, input_shape):
    shared = self._shared_variables
    for name, shape in self._variable_shapes(input_shape).items():
      if shape is None:
        variable = None
      elif shared is not None:
        variable = shared[name]
        if tuple(variable.shape) != tuple(shape):
          raise ValueError(
              f"Variable {name!r} of shape {tuple(variable.shape)} does not "
              f"fit layer {self.name!r}; expected shape {tuple(shape)}.")
        keras_graph.add_shared_weight(self, variable)
      else:
        variable = self.add_weight(name=name, shape=shape,
                                   initializer="zeros", trainable=False)
      keras_graph.set_untracked_attribute(self, name, variable)
    keras_graph.set_untracked_attribute(self, "_shared_variables", None)
    self.built = True

  def _read(self, name):
    variable = getattr(self, name)
    if variable is None:
      return None
    return tf.stop_gradient(_f32(variable))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentInput(keras.layers.Layer):
  """Starts moment propagation at a model input: [x, x, zeros (float32)]."""

  def call(self, inputs):
    return [inputs, inputs, tf.zeros_like(inputs, dtype=tf.float32)]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentDropout(_MomentLayer):
  """Moments through inverted dropout y = x * b / (1 - rate), b ~ Bern(1-rate).

  E[y] = m; E[y^2] = (v + m^2) / (1 - rate), so
  Var[y] = v / (1 - rate) + m^2 * rate / (1 - rate). `det` passes unchanged.

  Args:
    rate: the dropout rate, in [0, 1).
  """

  def __init__(self, rate, **kwargs):
    super().__init__(**kwargs)
    self.rate = float(rate)

  def call(self, inputs):
    det, mean, var = inputs
    mean, var = _f32(mean), _f32(var)
    keep = 1.0 - self.rate
    return [det, mean, var / keep + tf.square(mean) * (self.rate / keep)]

  def get_config(self):
    return {**super().get_config(), "rate": self.rate}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentActivation(_MomentLayer):
  """Moments through a named activation (`moment_rules.activation_moments`).

  Args:
    activation: an activation name or function (`keras.activations.get`).
  """

  def __init__(self, activation, **kwargs):
    super().__init__(**kwargs)
    self.activation = keras.activations.get(activation)

  def call(self, inputs):
    det, mean, var = inputs
    mean, var = moment_rules.activation_moments(self.activation, _f32(mean),
                                                _f32(var))
    return [self.activation(det), mean, var]

  def get_config(self):
    return {**super().get_config(),
            "activation": keras.activations.serialize(self.activation)}


class _TemplateLayer(_MomentLayer):
  """A moment layer driven by a weightless copy of a base layer.

  Args:
    layer: a weightless Keras layer, or its `keras.layers.serialize` dict. A
      fresh copy is kept (never the base layer object itself).
  """

  def __init__(self, layer, **kwargs):
    super().__init__(**kwargs)
    if isinstance(layer, keras.layers.Layer):
      layer = keras.layers.serialize(layer)
    layer = dict(layer)
    layer.pop("build_config", None)
    self.layer = keras.layers.deserialize(layer)

  def get_config(self):
    return {**super().get_config(), "layer": keras.layers.serialize(self.layer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentElementwise(_TemplateLayer):
  """Moments through an element-wise layer (ReLU, LeakyReLU, ELU) by 20-point
  Gauss-Hermite quadrature of the layer's own function."""

  def call(self, inputs):
    det, mean, var = inputs
    mean, var = moment_rules.quadrature_moments(self.layer, _f32(mean),
                                                _f32(var))
    return [self.layer(det), mean, var]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentRearrange(_TemplateLayer):
  """Moments through a layer that only moves, copies or zero-pads values
  (Flatten, Reshape, Permute, Concatenate, ...): it applies to all three."""

  def call(self, inputs):
    if isinstance(inputs[0], (list, tuple)):
      return [self.layer([x[i] for x in inputs]) for i in range(3)]
    det, mean, var = inputs
    return [self.layer(det), self.layer(_f32(mean)), self.layer(_f32(var))]


def _pad_amounts(size, pool, stride, padding):
  if padding == "valid":
    return (size - pool) // stride + 1, 0, 0
  out = -(-size // stride)
  total = max((out - 1) * stride + pool - size, 0)
  return out, total // 2, total - total // 2


def _window_slices(x, pool_size, strides, padding):
  """Splits a pooling window into shifted strided views.

  Args:
    x: (N, *spatial, C) channels-last tensor with static spatial sizes.

  Returns:
    A list over window offsets of (view, valid) pairs: view is
    (N, *out_spatial, C), valid a numpy bool array (1, *out_spatial, 1) that
    is False where the window reaches into the padding.
  """
  spatial = x.shape[1:-1]
  outs, pads = [], [[0, 0]]
  for size, pool, stride in zip(spatial, pool_size, strides):
    out, before, after = _pad_amounts(size, pool, stride, padding)
    outs.append(out)
    pads.append([before, after])
  pads.append([0, 0])
  x = tf.pad(x, pads)
  mask = np.pad(np.ones([1, *spatial, 1], bool), pads)
  slices = []
  for offsets in itertools.product(*[range(p) for p in pool_size]):
    index = (slice(None),) + tuple(
        slice(o, o + s * (n - 1) + 1, s)
        for o, s, n in zip(offsets, strides, outs)) + (slice(None),)
    slices.append((x[index], mask[index]))
  return slices


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentPooling(_TemplateLayer):
  """Moments through Max/Average/GlobalAverage pooling (1D, 2D, 3D).

  Average: mean of the means, sum of the variances / count^2 (exact under
  independence; 'same' padding counts only real inputs, as Keras does).
  Max: Clark's pairwise Gaussian max over the window (approximate).
  Global average: mean of means, mean of variances / number of positions.
  """

  def call(self, inputs):
    det, mean, var = inputs
    mean, var = _f32(mean), _f32(var)
    layer = self.layer
    out_det, out_mean = layer(det), layer(mean)
    if isinstance(layer, GLOBAL_AVERAGE_POOLING):
      spatial = (var.shape[1:-1] if layer.data_format == "channels_last" else
                 var.shape[2:])
      return [out_det, out_mean, layer(var) / float(np.prod(spatial))]
    channels_first = layer.data_format == "channels_first"
    if channels_first:
      rank = len(mean.shape)
      to_last = [0, *range(2, rank), 1]
      mean, var = tf.transpose(mean, to_last), tf.transpose(var, to_last)
    args = (layer.pool_size, layer.strides, layer.padding)
    mean_slices = _window_slices(mean, *args)
    var_slices = _window_slices(var, *args)
    if isinstance(layer, AVERAGE_POOLING):
      count = sum(valid.astype(np.float32) for _, valid in var_slices)
      out_var = tf.add_n([v for v, _ in var_slices]) / np.square(count)
    else:
      (out_mean, _), (out_var, ok) = mean_slices[0], var_slices[0]
      ok = tf.constant(ok)
      for (m, _), (v, valid_np) in zip(mean_slices[1:], var_slices[1:]):
        valid = tf.constant(valid_np)
        c_mean, c_var = moment_rules.clark_max_moments(out_mean, out_var, m, v)
        out_mean = tf.where(valid, tf.where(ok, c_mean, m), out_mean)
        out_var = tf.where(valid, tf.where(ok, c_var, v), out_var)
        ok = tf.logical_or(ok, valid)
    if channels_first:
      to_first = [0, rank - 1, *range(1, rank - 1)]
      out_var = tf.transpose(out_var, to_first)
      if not isinstance(layer, AVERAGE_POOLING):
        out_mean = tf.transpose(out_mean, to_first)
    return [out_det, out_mean, out_var]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentMerge(_MomentLayer):
  """Moments through Add, Subtract, Average or Multiply of independent inputs.

  Args:
    mode: "add", "subtract", "average" or "multiply".
  """

  def __init__(self, mode, **kwargs):
    super().__init__(**kwargs)
    if mode not in ("add", "subtract", "average", "multiply"):
      raise validation.invalid(
          "mode", "one of 'add', 'subtract', 'average', 'multiply'", mode)
    self.mode = mode

  def call(self, inputs):
    dets = [x[0] for x in inputs]
    means = [_f32(x[1]) for x in inputs]
    variances = [_f32(x[2]) for x in inputs]
    if self.mode == "multiply":
      det, mean, var = dets[0], means[0], variances[0]
      for d, m, v in zip(dets[1:], means[1:], variances[1:]):
        var = var * v + var * tf.square(m) + v * tf.square(mean)
        det, mean = det * d, mean * m
      return [det, mean, var]
    if self.mode == "subtract":
      return [dets[0] - dets[1], means[0] - means[1],
              variances[0] + variances[1]]
    det, mean, var = tf.add_n(dets), tf.add_n(means), tf.add_n(variances)
    if self.mode == "average":
      n = float(len(inputs))
      det, mean, var = det / n, mean / n, var / n**2
    return [det, mean, var]

  def get_config(self):
    return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentDense(_MomentLayer):
  """Moments through Dense: mean @ W + b, var @ W^2, then the activation.

  Args:
    units: output units of the Dense layer.
    activation: its activation (name or function).
    use_bias: whether it has a bias.
  """

  def __init__(self, units, activation="linear", use_bias=True, **kwargs):
    super().__init__(**kwargs)
    self.units = int(units)
    self.activation = keras.activations.get(activation)
    self.use_bias = bool(use_bias)

  def _variable_shapes(self, input_shape):
    in_dim = input_shape[1][-1]
    return {"kernel": (in_dim, self.units),
            "bias": (self.units,) if self.use_bias else None}

  def call(self, inputs):
    det, mean, var = inputs
    kernel, bias = self._read("kernel"), self._read("bias")
    det = tf.matmul(_f32(det), kernel)
    mean = tf.matmul(_f32(mean), kernel)
    var = tf.matmul(_f32(var), tf.square(kernel))
    if bias is not None:
      det, mean = det + bias, mean + bias
    mean, var = moment_rules.activation_moments(self.activation, mean, var)
    return [self.activation(det), mean, var]

  def get_config(self):
    return {**super().get_config(), "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentConv(_MomentLayer):
  """Moments through ConvND: conv(mean, W) + b, conv(var, W^2), activation.

  Args mirror `keras.layers.Conv{1,2,3}D`: rank, filters, kernel_size,
  strides, padding ("valid", "same", or "causal" for rank 1), data_format,
  dilation_rate, groups, activation, use_bias.
  """

  def __init__(self, rank, filters, kernel_size, strides, padding,
               data_format, dilation_rate, groups=1, activation="linear",
               use_bias=True, **kwargs):
    super().__init__(**kwargs)
    self.rank = int(rank)
    self.filters = int(filters)
    self.kernel_size = tuple(kernel_size)
    self.strides = tuple(strides)
    self.padding = padding
    self.data_format = data_format
    self.dilation_rate = tuple(dilation_rate)
    self.groups = int(groups)
    self.activation = keras.activations.get(activation)
    self.use_bias = bool(use_bias)

  def _variable_shapes(self, input_shape):
    axis = -1 if self.data_format == "channels_last" else 1
    in_channels = input_shape[1][axis]
    return {
        "kernel": self.kernel_size + (in_channels // self.groups,
                                      self.filters),
        "bias": (self.filters,) if self.use_bias else None}

  def _conv(self, x, kernel):
    padding = self.padding
    if padding == "causal":
      left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
      pads = [[0, 0], [left, 0], [0, 0]]
      if self.data_format == "channels_first":
        pads = [[0, 0], [0, 0], [left, 0]]
      x = tf.pad(x, pads)
      padding = "valid"
    return keras.ops.conv(x, kernel, strides=self.strides, padding=padding,
                          data_format=self.data_format,
                          dilation_rate=self.dilation_rate)

  def call(self, inputs):
    det, mean, var = inputs
    kernel, bias = self._read("kernel"), self._read("bias")
    det = self._conv(_f32(det), kernel)
    mean = self._conv(_f32(mean), kernel)
    var = self._conv(_f32(var), tf.square(kernel))
    if bias is not None:
      shape = ([1] * (self.rank + 1) + [self.filters]
               if self.data_format == "channels_last" else
               [1, self.filters] + [1] * self.rank)
      bias = tf.reshape(bias, shape)
      det, mean = det + bias, mean + bias
    mean, var = moment_rules.activation_moments(self.activation, mean, var)
    return [self.activation(det), mean, tf.maximum(var, 0.0)]

  def get_config(self):
    return {**super().get_config(), "rank": self.rank,
            "filters": self.filters, "kernel_size": self.kernel_size,
            "strides": self.strides, "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate, "groups": self.groups,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentBatchNormalization(_MomentLayer):
  """Moments through BatchNormalization in inference mode (affine per channel).

  Args:
    axis: the normalised axis.
    epsilon: the variance epsilon.
    center: whether there is a `beta`.
    scale: whether there is a `gamma`.
  """

  def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True,
               **kwargs):
    super().__init__(**kwargs)
    self.axis = int(axis)
    self.epsilon = float(epsilon)
    self.center = bool(center)
    self.scale = bool(scale)

  def _variable_shapes(self, input_shape):
    dim = (input_shape[1][self.axis],)
    return {"gamma": dim if self.scale else None,
            "beta": dim if self.center else None,
            "moving_mean": dim, "moving_variance": dim}

  def call(self, inputs):
    det, mean, var = inputs
    rank = len(mean.shape)
    shape = [1] * rank
    shape[self.axis] = -1
    a = tf.math.rsqrt(self._read("moving_variance") + self.epsilon)
    if self.scale:
      a = a * self._read("gamma")
    c = -self._read("moving_mean") * a
    if self.center:
      c = c + self._read("beta")
    a, c = tf.reshape(a, shape), tf.reshape(c, shape)
    return [_f32(det) * a + c, _f32(mean) * a + c, _f32(var) * tf.square(a)]

  def get_config(self):
    return {**super().get_config(), "axis": self.axis,
            "epsilon": self.epsilon, "center": self.center,
            "scale": self.scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentEmbedding(_MomentLayer):
  """Embedding lookup: deterministic ids give variance 0.

  Args:
    input_dim: vocabulary size.
    output_dim: embedding size.
  """

  def __init__(self, input_dim, output_dim, **kwargs):
    super().__init__(**kwargs)
    self.input_dim = int(input_dim)
    self.output_dim = int(output_dim)

  def _variable_shapes(self, input_shape):
    return {"embeddings": (self.input_dim, self.output_dim)}

  def call(self, inputs):
    det, mean, _ = inputs
    table = self._read("embeddings")
    det = tf.gather(table, tf.cast(det, tf.int32))
    mean = tf.gather(table, tf.cast(mean, tf.int32))
    return [det, mean, tf.zeros_like(mean)]

  def get_config(self):
    return {**super().get_config(), "input_dim": self.input_dim,
            "output_dim": self.output_dim}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MomentStatistic(keras.layers.Layer):
  """Turns output moments [det, mean, var] of shape (N, k) into a DPV.

  Args:
    statistic: "std" ((N,) for k = 1 else (N, k)), "predicted_class_std"
      ((N,), the std of the class the deterministic pass predicts) or
      "per_class_std" ((N, k)). "auto" must be resolved before.
  """

  def __init__(self, statistic, **kwargs):
    super().__init__(**kwargs)
    if statistic not in contract.STATISTICS[1:]:
      raise validation.invalid("statistic", f"one of {contract.STATISTICS[1:]}",
                               statistic)
    self.statistic = statistic

  def call(self, inputs):
    det, _, var = inputs
    std = tf.sqrt(tf.maximum(_f32(var), 0.0))
    if self.statistic == contract.STAT_PREDICTED_CLASS_STD:
      index = tf.argmax(det, axis=-1, output_type=tf.int32)
      return tf.gather(std, index, axis=-1, batch_dims=1)
    if self.statistic == contract.STAT_STD and std.shape[-1] == 1:
      return std[..., 0]
    return std

  def get_config(self):
    return {**super().get_config(), "statistic": self.statistic}
