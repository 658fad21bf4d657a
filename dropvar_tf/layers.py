"""Probe layers: record neuron activation strength during the one forward pass.

A probe sees the post-activation values of a hidden layer in the deterministic
pass and turns them into features for the variation head:

- "neurons" (default): every neuron's value. Rank-2 activations (batch, units)
  are kept as they are; feature maps of higher rank (batch, ..., channels) are
  averaged over their spatial axes, one strength per channel, so a conv layer
  gives as many features as it has filters.
- "summary": three numbers per layer: the mean activation, the L2 norm and
  the fraction of active (> 0) neurons.

Probes run on every served request, so each is written in as few TF ops as
possible (5-6 per summary, none for rank-2 "neurons"): `bench/dual_bench.py`
measures what they cost.
"""

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import validation

NEURONS = "neurons"
SUMMARY = "summary"
FEATURE_SETS = (NEURONS, SUMMARY)

_ops = keras.ops


def check_features(features):
  """Validates a feature-set name.

  Returns:
    `features`, unchanged.

  Raises:
    ValueError: `features` is not one of `FEATURE_SETS`.
  """
  if features not in FEATURE_SETS:
    raise validation.invalid("features", f"one of {FEATURE_SETS}", features)
  return features


@keras.saving.register_keras_serializable(package="dropvar_tf")
class ActivationStrength(keras.layers.Layer):
  """Activation-strength features of one layer's output.

  Input shape: (batch, units) or (batch, d1, ..., channels).
  Output shape: (batch, units) / (batch, channels) for "neurons";
  (batch, 3) for "summary".

  Args:
    features: "neurons" or "summary" (see the module docstring).
    nonnegative: promise that the input is never negative (a ReLU output):
      the fraction active is then `mean(sign(x))`, one op fewer. With a
      negative input the promise is broken and that feature is wrong.
    **kwargs: passed to `keras.layers.Layer`.

  Example:
  >>> probe = ActivationStrength(features="summary")
  >>> probe(np.ones((2, 4), "float32")).shape
  TensorShape([2, 3])
  """

  def __init__(self, features=NEURONS, nonnegative=False, **kwargs):
    super().__init__(**kwargs)
    self.features = check_features(features)
    self.nonnegative = bool(nonnegative)

  def call(self, inputs):
    # Every op here runs on each served request: keep them few (no cast or
    # reshape when the input is already float and of rank 2).
    x = inputs
    if x.dtype != self.compute_dtype:
      x = _ops.cast(x, self.compute_dtype)
    rank = len(x.shape)
    if rank < 2:
      x = _ops.expand_dims(x, -1)
    if self.features == NEURONS:
      if rank > 2:
        return _ops.mean(x, axis=tuple(range(1, rank - 1)))
      return x
    # Reductions over all non-batch axes, so feature maps need no reshape.
    axes = tuple(range(1, max(rank, 2)))
    mean = tf.reduce_mean(x, axis=axes)
    norm = l2_norm(x, axis=axes)
    # sign(), not a bool compare + cast: it measured faster on CPU
    # (docs/measurements.md).
    positive = x if self.nonnegative else tf.nn.relu(x)
    active = tf.reduce_mean(tf.math.sign(positive), axis=axes)
    return tf.stack([mean, norm, active], axis=-1)

  def compute_output_shape(self, input_shape):
    if self.features == SUMMARY:
      return (input_shape[0], 3)
    if len(input_shape) < 2:
      return (input_shape[0], 1)
    return (input_shape[0], input_shape[-1])

  def get_config(self):
    config = super().get_config()
    config.update({"features": self.features,
                   "nonnegative": self.nonnegative})
    return config


@keras.saving.register_keras_serializable(package="dropvar_tf")
class ActivationProbe(ActivationStrength):
  """Identity on the main path, activation strength as a side output.

  For models you build yourself: put a probe after any hidden layer and route
  its second output to a variation head. `add_variation_head` taps existing
  models without inserting probes into their main path.

  Input shape: any (batch, ...). Output: `(inputs, features)`, `inputs`
  unchanged, `features` as `ActivationStrength` computes them.

  Example:
  >>> h = keras.layers.Dense(8, activation="relu")(keras.Input((4,)))
  >>> h, strength = ActivationProbe(name="probe_1")(h)
  """

  def call(self, inputs):
    return inputs, super().call(inputs)

  def compute_output_shape(self, input_shape):
    return input_shape, super().compute_output_shape(input_shape)


# Output activations `OutputDropoutDelta` has a gradient rule for.
OUTPUT_ACTIVATIONS = ("linear", "sigmoid", "softmax")


def l2_norm(x, axis=-1, keepdims=False):
  """`sqrt(sum(x**2, axis))` in as few ops as the context allows.

  One fused `EuclideanNorm` op in graph and eager mode: one pass over `x`,
  no squared copy of it, so less time than square + sum + sqrt on large
  feature maps (docs/measurements.md). The three ops under XLA, which has no
  kernel for `EuclideanNorm`. Both give the same value up to float rounding.
  """
  if keras_graph.in_xla_context():
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=keepdims))
  return tf.math.reduce_euclidean_norm(x, axis=axis, keepdims=keepdims)


# Gauss-Hermite nodes and weights for E[f(eps)], eps ~ N(0, 1). Exact to
# float32 rounding while the spread is a few logits or less; where it is
# tens of logits the sigmoid is a step between nodes, and 64 nodes keep the
# std within about 5% (tests/layers_test.py).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite.hermgauss(64)
_GH_NODES = (_GH_NODES * np.sqrt(2.0)).astype("float32")
_GH_WEIGHTS = (_GH_WEIGHTS / np.sqrt(np.pi)).astype("float32")


def smoothing_applies(activation, statistic):
  """Whether `OutputDropoutDelta(smoothed=True)` takes this output."""
  if activation == "sigmoid":
    return statistic != contract.STAT_PER_CLASS_STD
  return (activation == "softmax" and
          statistic == contract.STAT_PREDICTED_CLASS_STD)


def smoothed_sigmoid_std(logit, spread):
  """std of sigmoid(logit + spread * eps), eps ~ N(0, 1), elementwise.

  Gauss-Hermite quadrature on the far tail of the sigmoid: the std of
  sigmoid(z) equals that of sigmoid(-z), so the nodes sit at
  `-|logit| + spread * eps`, where float32 keeps the small values' relative
  precision; two passes (mean, then squared deviations) avoid cancellation.
  (batch, 1) inputs broadcast against the nodes without an expand.
  Finite and >= 0 for every input, with one NaN test at the end: the
  infinities fall out of the quadrature (an infinite logit with a finite
  spread puts every node at sigmoid(-inf) = 0: a certain output, 0; an
  infinite spread puts half the weight at 0 and half at 1: 0.5), and
  whatever is NaN (or both infinite) gives 0.5, the largest std a
  probability has.
  """
  logit = tf.convert_to_tensor(logit, "float32")
  spread = tf.convert_to_tensor(spread, "float32")
  column = logit.shape.rank == 2 and logit.shape[-1] == 1
  if column:  # (batch, 1) broadcasts against the nodes as it is
    u = tf.sigmoid(spread * _GH_NODES - tf.abs(logit))        # (batch, 64)
  else:
    u = tf.sigmoid(spread[..., None] * _GH_NODES - tf.abs(logit)[..., None])
  # Sums, not matmuls: a GPU may run matmuls in TF32, whose rounding of the
  # mean would show as a spread where there is none.
  mean = tf.reduce_sum(u * _GH_WEIGHTS, axis=-1, keepdims=True)
  var = tf.reduce_sum(tf.square(u - mean) * _GH_WEIGHTS, axis=-1,
                      keepdims=column)
  std = tf.sqrt(var)
  return tf.where(tf.math.is_nan(std), 0.5, std)


@keras.saving.register_keras_serializable(package="dropvar_tf")
class OutputDropoutDelta(keras.layers.Layer):
  """Delta-method DPV of the dropout right before a Dense output layer.

  For an output layer `y = act(h_drop @ kernel + bias)` whose input `h` goes
  through inverted dropout of rate `p` (or Gaussian dropout of rate `p`),
  the noise makes each `h_j` vary with variance `h_j**2 * p / (1 - p)`.
  Linearising `act` at the deterministic pass gives, for a statistic with
  gradient `g` w.r.t. the logits,
  `Var ~ sum_j ((kernel @ g)_j)**2 * h_j**2 * p / (1 - p)`. Unless it takes
  the earlier dropouts (below), it ignores the dropout of earlier layers, so
  it is a cheap feature for the head (one small matmul), not an estimate on
  its own. The kernel is a non-trainable copy taken when the head is added.

  Inputs: `[h, y]`, h (batch, d) the output layer's input before dropout,
  y (batch, k) the model's output, then the earlier dropouts' inputs
  `h_1 .. h_n` (`earlier_dims`). Output: (batch, 1) for "std" with k = 1
  and "predicted_class_std", else (batch, k): estimated std.

  Smoothed (`smoothed=True`, sigmoid and softmax outputs with a "std" or
  "predicted_class_std" statistic): instead of linearising the output
  activation, which saturates as the output does (a confident output gets a
  std near 0 however much its logits vary), the layer takes the logit the
  statistic depends on (the sigmoid's logit; for softmax, the predicted
  class's log-odds `z_c - logsumexp(z_others)`), its linearised std `s` under
  the dropout above, and returns the std of `sigmoid(z + kappa * s * eps)` for
  `eps ~ N(0, 1)` by Gauss-Hermite quadrature. Scaling the logits and their
  std together (inputs scaled up, in a ReLU network) then keeps the estimate
  where MC dropout keeps it, the chance that the prediction flips. `kappa`
  (`noise_scale`, non-trainable, 1 until `fit_variation_head` fits it) stands
  for the dropout the layer does not see (that of earlier layers, unless it
  takes them), which widens the logits' spread by a factor the dropouts it
  sees cannot. Where it has to widen it a lot (as in recurrent models, where
  the last dropout is a small part of the noise), the Gaussian form does not
  hold and the fit switches the layer back to the linearised delta
  (`smoothing` = 0, non-trainable). The bias is a non-trainable copy, as the
  kernel.

  Earlier dropout (smoothed only, `earlier_dims`): the layer may also take the
  inputs `h_i` (batch, d_i) of Dropout (or GaussianDropout: the same variance)
  layers further down a single-input path to `h` (`heads.add_variation_head`
  finds them). Each adds `||a_i * h_i||**2` to the logit's variance, `a_i`
  (non-trainable, 0 until `fit_variation_head` sets it) a per-unit
  sensitivity: the root mean square, over the calibration inputs, of the
  logit's gradient with respect to `h_i`, weighted by `h_i**2`, times
  `sqrt(p_i / (1 - p_i))`. The gradient itself would cost a backward pass on
  every request; its calibration average costs one multiply and one norm, and
  still follows how strongly each earlier unit fires, which is what grows when
  inputs are scaled up and the earlier layers' dropout takes the larger share
  of the noise.

  Args:
    rate: dropout rate before the output layer.
    activation: "linear", "sigmoid" or "softmax".
    statistic: "std", "predicted_class_std" or "per_class_std".
    input_dim: d. units: k.
    smoothed: Gauss-Hermite smoothing instead of linearisation (see above);
      only where it applies (`smoothing_applies`), else refused.
    earlier_dims: widths d_i of the earlier dropout inputs the layer takes
      after `[h, y]` (smoothed and one logit only: k = 1, or
      "predicted_class_std"; see above).
    **kwargs: passed to `keras.layers.Layer`.
  """

  def __init__(self, rate, activation, statistic, input_dim, units,
               smoothed=False, earlier_dims=(), **kwargs):
    super().__init__(**kwargs)
    if activation not in OUTPUT_ACTIVATIONS:
      raise validation.invalid("activation", f"one of {OUTPUT_ACTIVATIONS}",
                               activation)
    self.rate = float(rate)
    self.activation = activation
    self.statistic = statistic
    self.input_dim = int(input_dim)
    self.units = int(units)
    self.kernel = self.add_weight(name="kernel",
                                  shape=(self.input_dim, self.units),
                                  trainable=False, initializer="zeros")
    self.smoothed = bool(smoothed)
    if self.smoothed and not smoothing_applies(activation, statistic):
      raise validation.invalid(
          "smoothed", "False for a linear output or a per-class statistic",
          smoothed)
    if self.smoothed:
      self.bias = self.add_weight(name="bias", shape=(self.units,),
                                  trainable=False, initializer="zeros")
      self.noise_scale = self.add_weight(name="noise_scale", shape=(),
                                         trainable=False, initializer="ones")
      # 1: smoothed; 0: linearised after all (`fit_variation_head` sets it
      # to 0 where the last dropout carries too little of the logit noise).
      self.smoothing = self.add_weight(name="smoothing", shape=(),
                                       trainable=False, initializer="ones")
    if isinstance(earlier_dims, (str, bytes)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
        for d in earlier_dims):
      raise validation.invalid("earlier_dims", "a list of positive ints",
                               earlier_dims)
    self.earlier_dims = tuple(int(d) for d in earlier_dims)
    if self.earlier_dims and not (self.smoothed and (
        self.units == 1 or
        statistic == contract.STAT_PREDICTED_CLASS_STD)):
      raise validation.invalid(
          "earlier_dims", "() unless smoothed=True with one logit (units=1 "
          "or statistic='predicted_class_std')", earlier_dims)
    self.sensitivities = [
        self.add_weight(name=f"sensitivity_{i}", shape=(d,), trainable=False,
                        initializer="zeros")
        for i, d in enumerate(self.earlier_dims)]

  def call(self, inputs):
    h, y = inputs[:2]
    h = tf.cast(h, "float32")
    y = tf.cast(y, "float32")
    # std = sqrt(p / (1 - p)) * ||(kernel @ g) * h||: the square root of
    # the noise factor is applied last, to a (batch, 1) or (batch, k) tensor.
    c = (self.rate / (1.0 - self.rate)) ** 0.5
    w = tf.cast(self.kernel, "float32")  # autocast under a float16 policy
    if not self.smoothed:
      return self._linearised_std(h, y, w, c)
    logit, spread = self.logit_and_std(h, inputs[2:], w)
    smoothed = smoothed_sigmoid_std(logit, spread * self.noise_scale)
    # The linearised delta from the same logit: |d sigmoid / d logit| times
    # its std. For softmax's predicted class p_c (1 - p_c) (onehot - q) =
    # p_c (onehot - y), q the softmax of the other classes: the same as
    # `_linearised_std`. Both are computed and one is picked: a select costs
    # a batch-1 pass less than a `tf.cond`'s function call.
    linearised = tf.sigmoid(logit) * tf.sigmoid(-logit) * spread
    return tf.where(self.smoothing > 0.5, smoothed, linearised)

  def _linearised_std(self, h, y, w, c):
    if self.activation == "softmax":
      if self.statistic == contract.STAT_PREDICTED_CLASS_STD:
        # tf ops, not keras.ops: keras' argmax adds six ops per call.
        onehot = tf.one_hot(tf.math.argmax(y, axis=-1), self.units)
        p_c = tf.reduce_max(y, axis=-1, keepdims=True)
        g = p_c * (onehot - y)                             # (batch, k)
        wg = tf.matmul(g, w, transpose_b=True)             # (batch, d)
        return l2_norm(wg * h, keepdims=True) * c
      noise = tf.square(h) * (c * c)
      eye = _ops.eye(self.units, dtype="float32")
      jac = y[:, :, None] * (eye[None] - y[:, None, :])    # (batch, k, k)
      wg = _ops.einsum("nck,dk->ncd", jac, w)
      return tf.sqrt(_ops.einsum("ncd,nd->nc", _ops.square(wg), noise))
    if self.units == 1:
      std = l2_norm(h * w[:, 0], keepdims=True)
    else:
      std = tf.sqrt(tf.matmul(tf.square(h), tf.square(w)))  # (batch, k)
    if self.activation == "sigmoid":
      std = std * (y * (1.0 - y))   # |d sigmoid / d logit|, y in [0, 1]
    return std * c

  def logit_and_std(self, h, earlier=(), w=None):
    """(logit, std): the logit and its linearised std under dropout.

    `std` is that of the dropout right before the output layer (`h`) and,
    with `earlier` (the inputs of the earlier dropout layers, in the order
    of `earlier_dims`), of theirs (see the class docstring); `noise_scale`
    left out. Both (batch, 1).
    """
    if len(earlier) != len(self.earlier_dims):
      raise validation.invalid(
          "earlier", f"{len(self.earlier_dims)} tensors (one per earlier "
          "dropout layer)", f"{len(earlier)} tensors")
    logit, spread = self.logit_and_spread(h, w)
    spread = spread * (self.rate / (1.0 - self.rate)) ** 0.5
    if not earlier:
      return logit, spread
    var = tf.square(spread)
    for x, a in zip(earlier, self.sensitivities):
      scaled = tf.cast(x, "float32") * tf.cast(a, "float32")
      var = var + tf.reduce_sum(tf.square(scaled), axis=-1, keepdims=True)
    return logit, tf.sqrt(var)

  def logit_and_spread(self, h, w=None):
    """(logit, s): the logit the statistic depends on, and its std / c.

    `s` is the linearised std of the logit under dropout of `h` with the
    noise factor `c = sqrt(p / (1 - p))` and `noise_scale` left out:
    (batch, 1) for softmax or k = 1, else (batch, k).
    """
    h = tf.cast(h, "float32")
    w = tf.cast(self.kernel, "float32") if w is None else w
    z = tf.matmul(h, w) + tf.cast(self.bias, "float32")
    if self.activation == "sigmoid":
      if self.units == 1:
        return z, l2_norm(h * w[:, 0], keepdims=True)
      return z, tf.sqrt(tf.matmul(tf.square(h), tf.square(w)))
    # Softmax: p_c = sigmoid(z_c - logsumexp(z_others)) exactly, c the
    # predicted class; the log-odds' gradient w.r.t. z is onehot - q, q the
    # softmax of the other classes. The log-sum-exp is shifted by the
    # largest other logit, so the log-odds stay finite however far apart
    # the logits are (inputs scaled up): `total` is in [1, k - 1].
    onehot = tf.one_hot(tf.math.argmax(z, axis=-1), self.units)
    others = z - onehot * 1e30  # float32 exp(-1e30) == 0
    runner_up = tf.reduce_max(others, axis=-1, keepdims=True)
    e = tf.exp(others - runner_up)
    total = tf.reduce_sum(e, axis=-1, keepdims=True)
    logit = (tf.reduce_max(z, axis=-1, keepdims=True) - runner_up -
             tf.math.log(total))
    wg = tf.matmul(onehot - e / total, w, transpose_b=True)  # (batch, d)
    return logit, l2_norm(wg * h, keepdims=True)

  def compute_output_shape(self, input_shape):
    batch = input_shape[0][0]
    if self.statistic == contract.STAT_PREDICTED_CLASS_STD:
      return (batch, 1)
    return (batch, self.units)

  def get_config(self):
    config = super().get_config()
    config.update({"rate": self.rate, "activation": self.activation,
                   "statistic": self.statistic, "input_dim": self.input_dim,
                   "units": self.units, "smoothed": self.smoothed,
                   "earlier_dims": list(self.earlier_dims)})
    return config


# Layers whose output is `activation(...)`, nothing added after it.
_ENDS_IN_ACTIVATION = (
    keras.layers.Activation, keras.layers.Dense, keras.layers.EinsumDense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose, keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D, keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D)


def is_relu_output(layer):
  """True when `layer`'s output is a plain ReLU's (never negative).

  A probe on such a layer is built with `nonnegative=True`.

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
