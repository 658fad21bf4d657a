"""Seeded Monte Carlo dropout: `SeededDropout` and `mc_dropout_model`.

Only dropout is sampled. `mc_dropout_model` clones the graph, reusing every
non-Dropout layer instance (weights shared, nothing copied) and replacing each
`keras.layers.Dropout` (subclasses included) by `SeededDropout`. The clone is
called with `training=False`, so BatchNormalization stays in inference mode
and nothing in the base model is updated.

A `SeededDropout` mask is the counter-based hash of `dropvar_tf.mask_hash`
(its docstring specifies it): a pure function of (seed, example key, sample
index, layer index, unit). Whoever runs the clone says which rows are which
with `row_context(example_seeds(...))`: `targets.mc_dropout_targets` does,
and so does the SavedModel's MC signature (`saved_model`). Outside a row
context, each call draws fresh seed-reproducible masks, as Keras' Dropout.

Example:

```python
clone = mc_dropout_model(model)      # model is not modified
keys = tf.range(8, dtype=tf.int64)
with row_context(mask_hash.example_seeds(0, keys, tf.zeros([8], tf.int32))):
  y = clone(x[:8])                   # sample t=0 of examples 0..7
```
"""

import contextlib

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf import mask_hash
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf


class _RowContext:
  """Per-row hash states seen by every SeededDropout call while active."""
  states = None


_CONTEXT = _RowContext()


@contextlib.contextmanager
def row_context(states):
  """Makes `states` the row states of the `SeededDropout` calls inside.

  Side effect: while the block runs (or a `tf.function` traces it), every
  `SeededDropout` call, in any model, masks row i of its input with row
  state `states[i]` instead of drawing a stand-alone mask. The previous
  states are restored on exit, also when the block raises.

  Args:
    states: (rows,) uint32 tensor, as `mask_hash.example_seeds` returns them
      for each row's (seed, key, sample index).

  Yields:
    None.
  """
  saved = _CONTEXT.states
  _CONTEXT.states = states
  try:
    yield
  finally:
    _CONTEXT.states = saved


def _apply_mask(inputs, states, unit_kmixed, layer_index, threshold, scale):
  """Inverted dropout with the hash mask; states broadcast against units."""
  h = mask_hash.finish_hash(states, layer_index, unit_kmixed)
  return tf.where(h >= threshold, inputs * scale, tf.zeros((), inputs.dtype))


# XLA fuses the ~20 integer ops of the hash into one loop over the units
# (about 2x faster on CPU than separate kernels), while the rest of the model
# keeps TF's own (oneDNN) kernels.
_apply_mask_xla = tf.function(_apply_mask, jit_compile=True)


@keras.saving.register_keras_serializable(package="dropvar_tf")
class SeededDropout(keras.layers.Layer):
  """Inverted dropout that is always on, with counter-based seeded masks.

  Inside a `row_context` (as `targets.mc_dropout_targets` runs it) the mask
  of each row is the pure function of (seed, example key, sample index,
  `layer_index`, unit) given in `dropvar_tf.mask_hash`. Called on its own
  (e.g. through `mc_dropout_model(model)(x)`), each call draws a fresh salt
  from a `keras.random.SeedGenerator(seed)` and uses it as the sample index
  with the row position in the batch as key, so repeated calls give
  different, seed-reproducible masks, as Keras' Dropout.

  Args:
    rate: float in [0, 1], fraction of units dropped.
    noise_shape: optional tuple, the mask shape including the batch entry
      (ignored: every row gets its own mask); None entries take the input's
      size.
    seed: integer seed of the stand-alone mode.
    layer_index: integer, position of the replaced layer in
      `keras_graph.dropout_layers(model)`; part of the mask hash.
    **kwargs: base `keras.layers.Layer` arguments.

  Input shape: (batch, ...). Output shape: same as input.
  """

  def __init__(self, rate, noise_shape=None, seed=None, layer_index=0,
               **kwargs):
    super().__init__(**kwargs)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
        0.0 <= rate <= 1.0):
      raise validation.invalid("rate", "a float in [0, 1]", rate)
    self.rate = float(rate)
    self.noise_shape = None if noise_shape is None else tuple(noise_shape)
    self.seed = seed
    self.layer_index = validation.check_int(layer_index, "layer_index", 0)
    self.seed_generator = keras.random.SeedGenerator(
        0 if seed is None else seed)
    self.supports_masking = True

  def compute_output_shape(self, input_shape):
    return input_shape

  def _unit_shape(self, inputs):
    """Per-example mask shape (static)."""
    shape = tuple(inputs.shape[1:])
    if self.noise_shape is not None:
      if len(self.noise_shape) != len(shape) + 1:
        raise validation.invalid(
            "noise_shape", f"a tuple of rank {len(shape) + 1} (the input's)",
            self.noise_shape)
      shape = tuple(s if n is None else n
                    for n, s in zip(self.noise_shape[1:], shape))
    if any(s is None for s in shape):
      raise ValueError(
          f"SeededDropout {self.name!r} needs static non-batch input "
          f"dimensions; received input shape {tuple(inputs.shape)}.")
    return shape

  def call(self, inputs, training=None):
    del training  # Always on: this layer only exists to sample dropout.
    if self.rate <= 0.0:
      return inputs
    if self.rate >= 1.0:
      return tf.zeros_like(inputs)
    unit_shape = self._unit_shape(inputs)
    states = _CONTEXT.states
    apply = _apply_mask_xla
    if states is None:
      rows = tf.shape(inputs)[0]
      salt = keras.random.randint((), 0, 2**31 - 1, dtype="int32",
                                  seed=self.seed_generator)
      states = mask_hash.example_seeds(
          0 if self.seed is None else self.seed,
          tf.range(rows, dtype=tf.int64),
          tf.fill([rows], tf.cast(salt, tf.uint32)))
      # Plain ops here: a stand-alone model may be exported and served
      # where XLA is not available.
      apply = _apply_mask
    units = np.arange(int(np.prod(unit_shape, dtype=np.int64)),
                      dtype=np.uint32).reshape(unit_shape)
    unit_kmixed = tf.constant(mask_hash.mixed_units(units)[None], tf.uint32)
    states = tf.reshape(states, [-1] + [1] * len(unit_shape))
    return apply(inputs, states, unit_kmixed,
                 tf.constant(self.layer_index, tf.uint32),
                 tf.constant(mask_hash.keep_threshold(self.rate), tf.uint32),
                 tf.constant(1.0 / (1.0 - self.rate), inputs.dtype))

  def get_config(self):
    config = super().get_config()
    config.update({"rate": self.rate, "noise_shape": self.noise_shape,
                   "seed": self.seed, "layer_index": self.layer_index})
    return config


def _spatial_noise_shape(layer):
  """noise_shape of Keras' spatial dropouts (mask shared over space)."""
  spatial = (keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
             keras.layers.SpatialDropout3D)
  if not isinstance(layer, spatial):
    return layer.noise_shape
  rank = {keras.layers.SpatialDropout1D: 3, keras.layers.SpatialDropout2D: 4,
          keras.layers.SpatialDropout3D: 5}[
              next(c for c in spatial if isinstance(layer, c))]
  if getattr(layer, "data_format", "channels_last") == "channels_first":
    return (None, None) + (1,) * (rank - 2)
  return (None,) + (1,) * (rank - 2) + (None,)


def mc_dropout_model(model):
  """Returns `model` with every Dropout always on, seeded; the rest inference.

  The graph is cloned with `keras.models.clone_model(..., recursive=True)`:
  every non-Dropout layer instance is reused (weights shared, nothing copied,
  `model` is not modified) and each `keras.layers.Dropout` (and subclass) is
  replaced by a `SeededDropout` with the same `rate` and `noise_shape`.
  Call the result with `training=False` (the default) so BatchNormalization
  and other training-dependent layers stay in inference mode.

  Args:
    model: a built Functional or Sequential `keras.Model` with at least one
      Dropout layer (nested models included) and the same inputs.

  Returns:
    A `keras.Model` with the same inputs and outputs as `model`.

  Raises:
    ValueError: `model` is invalid (see `validation.check_model`).
  """
  validation.check_model(model)
  index = {id(l): i for i, l in enumerate(keras_graph.dropout_layers(model))}

  def clone_function(layer):
    if isinstance(layer, keras.layers.Dropout):
      return SeededDropout(
          rate=layer.rate, noise_shape=_spatial_noise_shape(layer),
          seed=getattr(layer, "seed", None), layer_index=index[id(layer)],
          name=f"{layer.name}_seeded")
    return layer

  return keras.models.clone_model(model, clone_function=clone_function,
                                  recursive=True)
