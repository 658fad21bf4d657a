"""The layers of a variation head, registered for `.keras` saving.

`heads.add_variation_head` builds the head from these, after the probe layers
of `dropvar_tf.layers`:
- `PredictionFeatures`: features of the base model's prediction.
- `LogFeature`: log of a non-negative feature (the delta and moment DPVs).
- `HeadInputDense`: the head's first layer, one matmul per wide input.
- `VariationOutput`: the non-negative variation estimate; it keeps the head's
  metadata and refuses heads of an older feature format.
- `OutOfRange`: beside the heads (`add_variation_head(out_of_range=True)`),
  how far an input's activation strengths lie outside their calibration
  range.

They are registered as "dropvar_tf>ClassName", so a saved dual model loads
with `keras.saving.load_model` once `dropvar_tf` is imported.
"""

import numpy as np
from packaging import version

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf import validation

_ops = keras.ops

# `HeadInputDense` clips its inputs to [-FEATURE_BOUND, FEATURE_BOUND]. No
# feature comes near it on inputs a model was trained for, so those outputs
# are unchanged; on extreme inputs (activations of 1e19 and more, whose sums
# of squares overflow float32 to inf) it keeps the head's sums finite: a
# kernel entry would need to exceed 1e18 for one product to overflow, where
# inf * w - inf * w' gave NaN.
FEATURE_BOUND = 1e18

# Output transforms of `VariationOutput`.
LOG = "log"
IDENTITY = "identity"
TRANSFORMS = (LOG, IDENTITY)


@keras.saving.register_keras_serializable(package="dropvar_tf")
class PredictionFeatures(keras.layers.Layer):
  """Features of the base model's prediction for the head.

  One output unit (regression, binary probability): `[y, y**2]`. Several
  class probabilities (`probabilities=True`): `[max p, sum(p * log p)]`, the
  top probability and minus the entropy. Several other outputs: `[max y,
  sum(y**2)]`. These two cost three ops. The full sorted probability vector
  (plus the top-two margin) fitted no better and its sort costs a visible
  part of a small model's pass on CPU (docs/measurements.md).

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
  on each request (`bench/dual_bench.py` measures the head's cost). Inputs
  are clipped to +-`FEATURE_BOUND` first, so features that overflowed to inf
  on extreme inputs give finite sums.

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
      x = tf.clip_by_value(tf.cast(x, kernel.dtype), -FEATURE_BOUND,
                           FEATURE_BOUND)
      products.append(tf.matmul(x, kernel))
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


def _check_head_format(saved_version):
  """Refuses a head saved by a version that computed other features.

  Versions compare by their first three release numbers: pre-release,
  development and local segments are ignored ("0.2.0.dev1" computes the
  features of 0.2.0).

  Raises:
    ValueError: `saved_version` is older than `HEAD_FORMAT_VERSION`, or is
      not a PEP 440 version string.
  """
  if saved_version is None:
    return
  try:
    saved = version.Version(str(saved_version))
  except version.InvalidVersion as e:
    raise validation.invalid(
        "metadata", "a `dropvar_tf_version` that is a PEP 440 version "
        "string such as '0.2.0'", f"dropvar_tf_version={saved_version!r}"
    ) from e
  if saved.release[:3] < version.Version(HEAD_FORMAT_VERSION).release[:3]:
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
  "identity", `min(scale * max(z, 0), max_value)`; a NaN (features of an
  input whose own activations are NaN or Inf, as extreme inputs make them)
  becomes `max_value`: no estimate is finer than "as uncertain as the head
  can say". `eps`, `scale` and
  `max_value` are non-trainable weights set by `fit_variation_head` (so they
  are saved with the model; `saved_model.export_saved_model` serves them,
  as the head's other weights, as constants of the exported graph).

  With a prior (`prior_bound` set; log transform only) the layer takes
  `[z, prior]`, `prior` an analytic DPV estimate (batch, units) or (batch,),
  and the head's `z` only corrects it in log space: `exp(log(prior + eps) +
  clip(z, correction_low, correction_high))` replaces `exp(z)` above. The
  bounds are non-trainable weights that `fit_variation_head` sets to the
  range of corrections its calibration targets needed, within
  [-prior_bound, prior_bound] (or beyond, where the fit silences a prior
  that explains none of the targets). However far from its calibration
  data an input lies, the estimate then stays within the corrections seen
  there.
  Where `exp(...) - eps` would be 0 or less, the estimate is `MIN_SHARE *
  exp(...)` instead of 0: a tiny variation, never an exact 0.

  With `shrink=True` (with a prior) the layer takes `[z, prior, r]`, `r`
  (batch,) how far the input's features lie outside the head's calibration
  range (`OutOfRange`, 0 inside it), and the clipped correction `c` becomes
  `center + (c - center) / (1 + r)`, `center` (non-trainable, set by
  `fit_variation_head`) the mean correction its training rows needed: the
  further off its calibration data, the less the head's own say, down to the
  prior times its typical correction.

  Args:
    units: number of estimated statistics (1 gives output shape (batch,)).
    transform: "log" or "identity".
    metadata: JSON-able dict describing what the head estimates; kept in the
      config so it survives saving (see `heads.variation_head_metadata`).
      Its "dropvar_tf_version" must be at least `HEAD_FORMAT_VERSION`.
    prior_bound: None (no prior), or the bound (> 0) of the log-space
      correction of a prior.
    shrink: with a prior, shrink the correction toward its center as the
      input leaves the calibration range (see above).
    **kwargs: passed to `keras.layers.Layer`.

  Raises:
    ValueError: unknown `transform`, `units` < 1, a `prior_bound` that is not
      a positive number or comes with the identity transform, or metadata of
      a head made by a version that computed other features (or not a
      version).
  """

  # With a prior, the share of exp(...) kept where exp(...) - eps <= 0.
  MIN_SHARE = 0.01

  def __init__(self, units=1, transform=LOG, metadata=None, prior_bound=None,
               shrink=False, **kwargs):
    super().__init__(**kwargs)
    if shrink and prior_bound is None:
      raise validation.invalid("shrink", "False without a prior "
                               "(prior_bound=None)", shrink)
    self.shrink = bool(shrink)
    if transform not in TRANSFORMS:
      raise validation.invalid("transform", f"one of {TRANSFORMS}", transform)
    if prior_bound is not None and (
        isinstance(prior_bound, bool) or
        not isinstance(prior_bound, (int, float)) or not prior_bound > 0 or
        transform != LOG):
      raise validation.invalid(
          "prior_bound", "None or a number > 0 (with transform='log')",
          prior_bound)
    self.prior_bound = None if prior_bound is None else float(prior_bound)
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
    if self.prior_bound is not None:
      self.correction_low = self.add_weight(
          name="correction_low", shape=(), trainable=False,
          initializer=keras.initializers.Constant(-self.prior_bound))
      self.correction_high = self.add_weight(
          name="correction_high", shape=(), trainable=False,
          initializer=keras.initializers.Constant(self.prior_bound))
    if self.shrink:
      self.correction_center = self.add_weight(
          name="correction_center", shape=(), trainable=False,
          initializer="zeros")

  def call(self, inputs):
    if self.prior_bound is not None:
      z, prior = inputs[:2]
      prior = _ops.cast(prior, "float32")
      if len(prior.shape) == 1:
        prior = _ops.expand_dims(prior, -1)
      # A prior above max_value (overflowed to inf, or far off the
      # calibration data) counts as max_value: with a correction below 0
      # the estimate stays below the cap. A NaN one stays NaN, so that the
      # estimate becomes max_value below.
      # Weights are read in float32 (a float16 policy autocasts them).
      eps, low, high, cap = (_ops.cast(w, "float32") for w in (
          self.eps, self.correction_low, self.correction_high,
          self.max_value))
      prior = _ops.minimum(_ops.relu(prior), cap)
      correction = _ops.minimum(_ops.maximum(_ops.cast(z, "float32"), low),
                                high)
      if self.shrink:
        center = _ops.cast(self.correction_center, "float32")
        far = _ops.reshape(_ops.cast(inputs[2], "float32"), (-1, 1))
        correction = center + (correction - center) / (1.0 + far)
      # exp(log(prior + eps) + correction), one op less.
      e = (prior + eps) * _ops.exp(correction)
      # >= 0 (or NaN): no relu needed.
      v = self.scale * _ops.maximum(e - eps, self.MIN_SHARE * e)
    else:
      z = inputs
      if z.dtype != "float32":
        z = _ops.cast(z, "float32")
      # exp may overflow to inf: the cap below turns it into max_value.
      v = _ops.exp(z) - self.eps if self.transform == LOG else z
      v = self.scale * _ops.relu(v)
    cap = _ops.cast(self.max_value, v.dtype)  # autocast under float16
    v = tf.where(tf.math.is_nan(v), cap, _ops.minimum(v, cap))
    if self.units == 1:
      v = _ops.squeeze(v, axis=-1)
    return v

  def compute_output_shape(self, input_shape):
    if self.prior_bound is not None:
      input_shape = input_shape[0]
    if self.units == 1:
      return tuple(input_shape[:-1])
    return tuple(input_shape)

  def to_raw(self, variation, prior=None):
    """Numpy inverse of the output transform, for building training targets.

    Args:
      variation: target estimates, (N,) or (N, units).
      prior: with a prior, its values for the same examples, shaped like
        `variation` (or (N, 1) for (N,)); the raw value is then the clipped
        log-space correction.
    """
    v = np.asarray(variation, "float64") / float(self.scale.numpy())
    if self.transform != LOG:
      return v
    eps = float(self.eps.numpy())
    if self.prior_bound is None:
      return np.log(v + eps)
    p = np.maximum(np.asarray(prior, "float64").reshape(v.shape), 0.0)
    return np.clip(np.log(v + eps) - np.log(p + eps),
                   float(self.correction_low.numpy()),
                   float(self.correction_high.numpy()))

  def get_config(self):
    config = super().get_config()
    config.update({"units": self.units, "transform": self.transform,
                   "metadata": self.metadata,
                   "prior_bound": self.prior_bound, "shrink": self.shrink})
    return config


@keras.saving.register_keras_serializable(package="dropvar_tf")
class OutOfRange(keras.layers.Layer):
  """How far features lie outside the range they had on calibration inputs.

  Each feature j (the inputs side by side, d columns) has a calibration
  range [low_j, high_j] (its `quantile` and `1 - quantile` quantiles on the
  calibration features, `set_range`), with center c_j and half-width w_j.
  The signal is

    max(0, max_j |x_j - c_j| / w_j - 1)

  the largest distance of a feature outside its calibration range, in
  half-widths of that range (1: as far beyond an end as the end is from the
  center); 0 when every feature is inside its range. The maximum, not a
  mean: one feature far out is enough to call an input unlike the
  calibration inputs, however many others look usual. The signal is capped
  at `MAX_VALUE`, and is `MAX_VALUE` where a feature is NaN or infinite
  (activations that overflowed), so it is finite for every input.

  Cost: over the (batch, d) features, one multiply, one subtract, one abs
  and two reductions (the max, and a sum that finds NaN features: XLA's
  max drops NaN); the rest is per row. Half-widths, not standard
  deviations, as units: these fold into one multiply and one subtract,
  where per-feature standard deviations need one more pass over the
  features (measured in docs/measurements.md).

  Weights (non-trainable): `scale` = 1 / w and `offset` = c / w, so that the
  signal reads `|x * scale - offset|`. Before `set_range` both are 0: the
  signal is 0 for every input whose features are finite
  (`export_saved_model` refuses such a dual).

  Input: a list of (batch, d_i) tensors (or one (batch, d) tensor). Output:
  (batch,), float32.

  Args:
    quantile: the calibration range is [quantile, 1 - quantile] quantiles of
      each feature, 0 <= quantile < 0.5 (0: min and max).
    **kwargs: passed to `keras.layers.Layer`.

  Example:
  >>> layer = OutOfRange()
  >>> layer.set_range(calibration_features)   # (N, d) numpy
  >>> layer(features)                         # (batch,)
  """

  # The largest signal: also that of NaN or infinite features.
  MAX_VALUE = 1e30
  # A half-width is at least this share of the feature's largest calibration
  # magnitude (and at least WIDTH_FLOOR): a feature constant on the
  # calibration inputs flags changes beyond float32 rounding, not rounding.
  RELATIVE_WIDTH_FLOOR = 1e-3
  WIDTH_FLOOR = 1e-6

  def __init__(self, quantile=0.001, **kwargs):
    super().__init__(**kwargs)
    if (isinstance(quantile, bool) or
        not isinstance(quantile, (int, float)) or not 0 <= quantile < 0.5):
      raise validation.invalid("quantile", "a number in [0, 0.5)", quantile)
    self.quantile = float(quantile)

  def build(self, input_shape):
    if not (isinstance(input_shape, (list, tuple)) and input_shape and
            isinstance(input_shape[0], (list, tuple))):
      input_shape = [input_shape]
    width = int(sum(int(shape[-1]) for shape in input_shape))
    self.scale = self.add_weight(name="scale", shape=(width,),
                                 trainable=False, initializer="zeros")
    self.offset = self.add_weight(name="offset", shape=(width,),
                                  trainable=False, initializer="zeros")

  def call(self, inputs):
    if isinstance(inputs, (list, tuple)):
      x = inputs[0] if len(inputs) == 1 else tf.concat(list(inputs), axis=-1)
    else:
      x = inputs
    x = _ops.cast(x, "float32")
    reach = tf.abs(x * self.scale - self.offset)
    signal = tf.nn.relu(tf.reduce_max(reach, axis=-1) - 1.0)
    # A NaN anywhere in the row makes the sum NaN (XLA's reduce_max skips
    # NaN, TF's keeps it).
    bad = tf.math.is_nan(tf.reduce_sum(reach, axis=-1))
    return tf.where(bad, self.MAX_VALUE, tf.minimum(signal, self.MAX_VALUE))

  def compute_output_shape(self, input_shape):
    first = input_shape[0] if isinstance(input_shape[0], (list, tuple)) \
        else input_shape
    return (first[0],)

  def set_range(self, features):
    """Sets the calibration range from calibration features.

    Args:
      features: (N, d) array, N >= 1, the layer's inputs side by side on
        calibration inputs; rows with NaN or infinite values are skipped.

    Raises:
      ValueError: `features` has the wrong width, or no finite row.
    """
    f = np.asarray(features, "float64")
    width = int(self.scale.shape[0])
    if f.ndim != 2 or f.shape[1] != width:
      raise validation.invalid("features", f"an (N, {width}) array",
                               f"shape {f.shape}")
    f = f[np.all(np.isfinite(f), axis=1)]
    if not len(f):
      raise validation.invalid("features", "at least one row of finite "
                               "features", "none")
    low, high = np.quantile(f, [self.quantile, 1 - self.quantile], axis=0)
    center = (low + high) / 2
    half_width = np.maximum.reduce([
        (high - low) / 2,
        self.RELATIVE_WIDTH_FLOOR * np.maximum(np.abs(low), np.abs(high)),
        np.full(width, self.WIDTH_FLOOR)])
    self.scale.assign((1.0 / half_width).astype("float32"))
    self.offset.assign((center / half_width).astype("float32"))

  def ranges(self):
    """(low, high) numpy arrays: the range of each feature (floors applied)."""
    scale = self.scale.numpy().astype("float64")
    with np.errstate(divide="ignore", invalid="ignore"):
      half_width = 1.0 / scale
      center = self.offset.numpy() * half_width
    return center - half_width, center + half_width

  def get_config(self):
    config = super().get_config()
    config.update({"quantile": self.quantile})
    return config
