"""Seeded Monte Carlo dropout: every dropout source on, the rest inference.

`mc_dropout_model(model)` returns an `MCDropoutModel` that calls `model`
with `training=False` (BatchNormalization and every other layer in inference
mode, nothing updated) while each dropout source of
`sources.find_sources(model)` draws seeded noise: Dropout and its subclasses,
MultiHeadAttention's attention dropout, RNN `dropout`/`recurrent_dropout`,
GaussianDropout, AlphaDropout and registered layers, wherever they sit.

Design: the sources are switched on in place, for the duration of the call
(`sampling`), rather than by cloning the graph. Cloning reaches only the
layers of a Functional or Sequential graph; a Dropout inside a custom layer,
a subclassed model or MultiHeadAttention, and the masks an RNN cell draws
inside its step loop, are not graph nodes. Instead, while an `MCDropoutModel`
runs (or a `tf.function`/XLA traces it), each source instance gets an
instance attribute that shadows its class's method: Dropout-like layers a
`call` that draws the seeded noise, RNN cells `get_dropout_mask` /
`get_recurrent_dropout_mask` that return a seeded mask, cached for the
sequence as Keras caches its own, and the RNN layer a `call` that runs its
cells in training mode (the only training-dependent behaviour of Keras' RNN
layers is their dropout). The context manager restores every attribute on
exit, also on errors, so `model` itself is never changed; weights are shared,
not copied. The traced graph keeps the noise ops, so exported signatures work
as before.

The noise of each source is drawn by a `SeededDropout` (one per source, held
by the `MCDropoutModel`): the counter-based hash of `dropvar_tf.mask_hash`,
a pure function of (seed, example key, sample index, source index, unit).
For models whose only sources are Dropout layers, each called once per pass,
masks, indices and units are those of the earlier graph-cloning
implementation, so targets, the Beam pipeline and exported `mc_dropout`
signatures are bit-identical. Whoever runs
the model says which rows are which with `row_context(example_seeds(...))`:
`targets.mc_dropout_targets` does, and so does the SavedModel's MC signature
(`saved_model`). Outside a row context, each call draws fresh
seed-reproducible noise, as Keras' layers do.

A source called more than once in one pass (a Dropout layer applied to two
tensors, an RNN layer run on two sequences) draws an independent mask per
call, as Keras does: its n-th call in the pass (counted from 0 in call order)
hashes with index `index + n * CALL_STRIDE`, so first calls keep the masks
of their index. Limit: a source must see the model's rows as its batch (not,
e.g., a `TimeDistributed` reshape of them).

Example:

```python
clone = mc_dropout_model(model)      # model is not modified
keys = tf.range(8, dtype=tf.int64)
with row_context(mask_hash.example_seeds(0, keys, tf.zeros([8], tf.int32))):
  y = clone(x[:8])                   # sample t=0 of examples 0..7
```
"""

import contextlib
import math
import threading

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf import mask_hash
from dropvar_tf import sources
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf


# A source's n-th call in one pass hashes with `index + n * CALL_STRIDE`.
CALL_STRIDE = 2**20


class _RowContext(threading.local):
  """Per-row hash states seen by every SeededDropout call while active.

  Per thread: a row context entered in one thread never leaks into another's
  calls or traces.
  """
  states = None


_CONTEXT = _RowContext()
# Held while a model's sources are switched (`sampling`): entries and exits
# of two threads must not interleave, or a layer could stay switched.
_SAMPLING_LOCK = threading.RLock()


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

  Besides its own `call` (inverted dropout), it draws the noise of the other
  source kinds for `MCDropoutModel`: `scaled_keep_mask` (RNN masks),
  `gaussian`, `alpha` and `uniform` (registered sources).

  Args:
    rate: float in [0, 1], fraction of units dropped.
    noise_shape: optional tuple, the mask shape including the batch entry
      (ignored: every row gets its own mask); None entries take the input's
      size.
    seed: integer seed of the stand-alone mode.
    layer_index: integer in [0, 2**20), position of the source in
      `sources.find_sources(model)`; part of the mask hash (call n of the
      source in a pass hashes `layer_index + n * CALL_STRIDE`).
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
    if self.layer_index >= CALL_STRIDE:
      raise validation.invalid("layer_index", f"an integer below {CALL_STRIDE}",
                               layer_index)
    # Which call of the source in the pass this is (`_numbered`); 0 outside
    # `sampling`.
    self.call_number = 0
    self.seed_generator = keras.random.SeedGenerator(
        0 if seed is None else seed)
    self.supports_masking = True

  def compute_output_shape(self, input_shape):
    return input_shape

  def _unit_shape(self, inputs):
    """Per-example noise shape: a static tuple, or a 1-D tensor if unknown."""
    shape = tuple(inputs.shape[1:])
    if self.noise_shape is not None:
      if len(self.noise_shape) != len(shape) + 1:
        raise validation.invalid(
            "noise_shape", f"a tuple of rank {len(shape) + 1} (the input's)",
            self.noise_shape)
      shape = tuple(s if n is None else n
                    for n, s in zip(self.noise_shape[1:], shape))
    if all(s is not None for s in shape):
      return shape
    dynamic = tf.shape(inputs)[1:]
    return tf.stack([dynamic[i] if s is None else s
                     for i, s in enumerate(shape)])

  def _hash_index(self):
    """The index word of the mask hash: `layer_index` of this call number."""
    return tf.constant(self.layer_index + self.call_number * CALL_STRIDE,
                       tf.uint32)

  def _unit_words(self, unit_shape):
    """Mixed unit words, (1, *unit_shape) uint32 (`mask_hash.mixed_units`)."""
    if isinstance(unit_shape, tuple):
      units = np.arange(int(np.prod(unit_shape, dtype=np.int64)),
                        dtype=np.uint32).reshape(unit_shape)
      return tf.constant(mask_hash.mixed_units(units)[None], tf.uint32)
    units = tf.reshape(tf.range(tf.reduce_prod(unit_shape)), unit_shape)
    return mask_hash.mixed_units_tf(units)[None]

  def _row_states(self, inputs):
    """(rows,) hash states and whether they come from a `row_context`."""
    states = _CONTEXT.states
    if states is not None:
      return states, True
    rows = tf.shape(inputs)[0]
    salt = keras.random.randint((), 0, 2**31 - 1, dtype="int32",
                                seed=self.seed_generator)
    return mask_hash.example_seeds(
        0 if self.seed is None else self.seed,
        tf.range(rows, dtype=tf.int64),
        tf.fill([rows], tf.cast(salt, tf.uint32))), False

  def hash_bits(self, inputs, count=None):
    """The mask hashes of `inputs`' rows: (rows, *per-example noise shape).

    Side effect: outside a `row_context`, advances the seed generator.

    Args:
      inputs: (rows, ...) tensor.
      count: optional integer: hash `count` masks per row, as the leading
        entry of the per-example shape: (rows, count, ...).
    """
    unit_shape = self._unit_shape(inputs)
    if count is not None:
      unit_shape = ((count,) + unit_shape if isinstance(unit_shape, tuple)
                    else tf.concat([[count], unit_shape], 0))
    rank = len(inputs.shape) - 1 + (count is not None)
    states, _ = self._row_states(inputs)
    states = tf.reshape(states, [-1] + [1] * rank)
    return mask_hash.finish_hash(states,
                                 self._hash_index(),
                                 self._unit_words(unit_shape))

  def call(self, inputs, training=None):
    del training  # Always on: this layer only exists to sample dropout.
    if self.rate <= 0.0:
      return inputs
    if self.rate >= 1.0:
      return tf.zeros_like(inputs)
    unit_shape = self._unit_shape(inputs)
    states, in_context = self._row_states(inputs)
    # Plain ops outside a row context: a stand-alone model may be exported
    # and served where XLA is not available.
    apply = _apply_mask_xla if in_context else _apply_mask
    states = tf.reshape(states, [-1] + [1] * (len(inputs.shape) - 1))
    return apply(inputs, states, self._unit_words(unit_shape),
                 self._hash_index(),
                 tf.constant(mask_hash.keep_threshold(self.rate), tf.uint32),
                 tf.constant(1.0 / (1.0 - self.rate), inputs.dtype))

  def scaled_keep_mask(self, inputs, count=None):
    """Keras' RNN dropout mask for `inputs`: 0 or 1 / (1 - rate) per unit.

    Args:
      inputs: (rows, ...) step input (or state) of an RNN cell.
      count: optional integer, for cells that index their mask by gate
        (`keras_graph.rnn_mask_count`): then `count` independent masks,
        stacked as (count, rows, ...).

    Returns:
      A tensor of the dtype of `inputs`.
    """
    keep = self.hash_bits(inputs, count) >= tf.constant(
        mask_hash.keep_threshold(self.rate), tf.uint32)
    mask = tf.where(keep,
                    tf.constant(1.0 / (1.0 - self.rate), inputs.dtype),
                    tf.zeros((), inputs.dtype))
    if count is None:
      return mask
    rank = len(mask.shape)
    return tf.transpose(mask, [1, 0] + list(range(2, rank)))

  def uniform(self, inputs):
    """Seeded float32 uniforms in (0, 1), one per unit of the noise shape."""
    return mask_hash.uniform_from_hash(self.hash_bits(inputs))

  def gaussian(self, inputs):
    """GaussianDropout: `inputs` times N(1, rate / (1 - rate)) noise."""
    if self.rate <= 0.0:
      return inputs
    stddev = math.sqrt(self.rate / (1.0 - self.rate))
    noise = 1.0 + stddev * tf.math.ndtri(self.uniform(inputs))
    return inputs * tf.cast(noise, inputs.dtype)

  def alpha(self, inputs):
    """AlphaDropout: Keras' affine formula with the seeded keep mask."""
    if not 0.0 < self.rate < 1.0:  # Keras' AlphaDropout passes these through.
      return inputs
    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946
    alpha_p = -alpha * scale
    kept = tf.cast(self.hash_bits(inputs) >= tf.constant(
        mask_hash.keep_threshold(self.rate), tf.uint32), inputs.dtype)
    a = ((1 - self.rate) * (1 + self.rate * alpha_p**2)) ** -0.5
    b = -a * alpha_p * self.rate
    return a * (inputs * kept + alpha_p * (1 - kept)) + b

  def get_config(self):
    config = super().get_config()
    config.update({"rate": self.rate, "noise_shape": self.noise_shape,
                   "seed": self.seed, "layer_index": self.layer_index})
    return config


# A model may hold SeededDropout layers (e.g. a saved MC clone): they are
# dropout sources as Keras' Dropout is.
sources.add_dropout_class(SeededDropout)


# Input rank of each Keras spatial dropout.
_SPATIAL_RANKS = {keras.layers.SpatialDropout1D: 3,
                  keras.layers.SpatialDropout2D: 4,
                  keras.layers.SpatialDropout3D: 5}


def _spatial_noise_shape(layer):
  """noise_shape of Keras' spatial dropouts (mask shared over space)."""
  rank = next((r for cls, r in _SPATIAL_RANKS.items()
               if isinstance(layer, cls)), None)
  if rank is None:
    return layer.noise_shape
  if getattr(layer, "data_format", "channels_last") == "channels_first":
    return (None, None) + (1,) * (rank - 2)
  return (None,) + (1,) * (rank - 2) + (None,)


def _noise_layer(found):
  """The SeededDropout that draws the noise of one source."""
  layer = found.layer
  if found.kind in (sources.DROPOUT, sources.SPATIAL_DROPOUT,
                    sources.ATTENTION_DROPOUT,
                    sources.ALPHA_DROPOUT):
    noise_shape = _spatial_noise_shape(layer)
  else:
    noise_shape = None
  return SeededDropout(
      rate=min(max(found.rate or 0.0, 0.0), 1.0), noise_shape=noise_shape,
      seed=getattr(layer, "seed", None), layer_index=found.index,
      name=f"source_{found.index}_seeded")


@contextlib.contextmanager
def _numbered(noise, number):
  """Makes `noise` draw the masks of call `number` of its source."""
  if noise.layer_index + number * CALL_STRIDE >= 2**32:
    limit = (2**32 - 1 - noise.layer_index) // CALL_STRIDE + 1
    raise validation.invalid(
        "model", f"dropout sources called at most {limit} times in one "
        "forward pass (each call draws its own masks)",
        f"source {noise.layer_index} ({noise.name!r}) called more often")
  keras_graph.set_untracked_attribute(noise, "call_number", number)
  try:
    yield
  finally:
    keras_graph.set_untracked_attribute(noise, "call_number", 0)


def _replaced_call(found, noise, calls):
  """What `found.layer.call` becomes while sampling (Dropout-like kinds).

  Each call in the pass draws its own mask: `calls` counts the source's
  calls since `sampling` began.
  """
  layer = found.layer
  if found.noise_fn is not None:
    noise_fn = found.noise_fn

    def draw(inputs):
      return noise_fn(layer, inputs, noise.uniform(inputs))
  elif found.kind == sources.GAUSSIAN_DROPOUT:
    draw = noise.gaussian
  elif found.kind == sources.ALPHA_DROPOUT:
    draw = noise.alpha
  else:
    draw = noise.call

  def call(inputs, *args, **kwargs):
    del args, kwargs  # training and the like: the noise is always on.
    number = calls.get(found.index, 0)
    calls[found.index] = number + 1
    with _numbered(noise, number):
      return draw(inputs)
  return call


def _cached_mask(noise, cache, key, count, calls):
  """RNN mask getter: one seeded mask per sequence (per RNN call).

  The mask of the RNN's n-th call in the pass (`calls[key]`, counted by
  `_reset_mask`) is that of call number n.
  """
  def get_mask(step_input):
    if key not in cache:
      with _numbered(noise, calls.get(key, 0)):
        cache[key] = noise.scaled_keep_mask(step_input, count)
    return cache[key]
  return get_mask


def _reset_mask(cache, key, calls):
  """RNN mask resetter: the next call of the RNN draws a new mask.

  Keras resets an RNN's masks after each sequence it runs.
  """
  def reset():
    if cache.pop(key, None) is not None:
      calls[key] = calls.get(key, 0) + 1
  return reset


def _training_call(call):
  """An RNN call that runs its cells in training mode (their dropout on)."""
  def call_in_training(*args, **kwargs):
    kwargs["training"] = True
    return call(*args, **kwargs)
  return call_in_training


def _patches(found_sources, noise_layers):
  """(object, attribute, value) to set while sampling, for every source."""
  patches, owners, cache, calls = [], set(), {}, {}
  for found, noise in zip(found_sources, noise_layers):
    if found.owner is None:
      patches.append((found.layer, "call",
                      _replaced_call(found, noise, calls)))
      continue
    cell = found.layer
    getter, resetter = (
        ("get_dropout_mask", "reset_dropout_mask")
        if found.kind == sources.RNN_DROPOUT else
        ("get_recurrent_dropout_mask", "reset_recurrent_dropout_mask"))
    key = (found.index,)
    patches.append((cell, getter, _cached_mask(
        noise, cache, key, keras_graph.rnn_mask_count(cell), calls)))
    patches.append((cell, resetter, _reset_mask(cache, key, calls)))
    if id(found.owner) not in owners:
      owners.add(id(found.owner))
      patches.append((found.owner, "call", _training_call(found.owner.call)))
  return patches, (cache, calls)


_MISSING = object()


@contextlib.contextmanager
def sampling(found_sources, noise_layers):
  """Makes every source draw its seeded noise while the block runs.

  Side effect: while the block runs (or a `tf.function` traces it), the
  source layers of `found_sources` (shared with the base model) have their
  `call` (Dropout-like kinds) or their RNN cell's mask getters replaced by
  instance attributes, and RNN layers with dropout run their cells in
  training mode; everything is restored on exit, also when the block raises.
  A base model called by another thread during the block would sample too.

  Args:
    found_sources: `sources.find_sources(model)`.
    noise_layers: one `SeededDropout` per source (`mc_dropout_model` makes
      them), drawing its noise.

  Yields:
    None.
  """
  with _SAMPLING_LOCK:
    patches, state = _patches(found_sources, noise_layers)
    saved = []
    try:
      for obj, name, value in patches:
        previous = obj.__dict__.get(name, _MISSING)
        keras_graph.set_untracked_attribute(obj, name, value)
        saved.append((obj, name, previous))
      yield
    finally:
      for obj, name, previous in reversed(saved):
        if previous is _MISSING:
          object.__delattr__(obj, name)
        else:
          keras_graph.set_untracked_attribute(obj, name, previous)
      for counts in state:
        counts.clear()


@keras.saving.register_keras_serializable(package="dropvar_tf")
class MCDropoutModel(keras.Model):
  """`model` with every dropout source on and seeded, the rest in inference.

  Made by `mc_dropout_model`. Calling it calls `model` with `training=False`
  (BatchNormalization and everything else in inference mode, nothing
  updated) inside `sampling`, so that each dropout source of
  `sources.find_sources(model)` draws the seeded noise of its index.

  Args:
    model: a built `keras.Model` (shared, not copied, not modified).
    **kwargs: base `keras.Model` arguments (e.g. `name`).
  """

  def __init__(self, model, **kwargs):
    kwargs.setdefault("name", f"{model.name}_mc")
    super().__init__(**kwargs)
    self.base_model = model
    found = sources.find_sources(model)
    keras_graph.set_untracked_attribute(self, "sources", found)
    self.noise_layers = [_noise_layer(f) for f in found]
    self.built = True

  def call(self, inputs, training=None):
    del training  # Dropout sources always on, every other layer inference.
    with sampling(self.sources, self.noise_layers):
      return self.base_model(inputs, training=False)

  def get_config(self):
    return {"name": self.name,
            "model": keras.saving.serialize_keras_object(self.base_model)}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    model = keras.saving.deserialize_keras_object(
        config.pop("model"), custom_objects=custom_objects)
    return cls(model, **config)


def mc_dropout_model(model):
  """Returns `model` with every dropout source on, seeded; the rest inference.

  The sources are those of `sources.dropout_sources(model)`: Dropout
  (and subclasses), MultiHeadAttention dropout, RNN dropout and recurrent
  dropout, GaussianDropout, AlphaDropout and registered layers, at any depth.
  Each draws the noise of its index in that list (`mask_hash`). Every weight
  is shared, nothing is copied, `model` is not modified; BatchNormalization
  and other training-dependent layers stay in inference mode.

  Args:
    model: a built Functional, Sequential or subclassed `keras.Model` with at
      least one dropout source.

  Returns:
    An `MCDropoutModel` taking the inputs of `model` and returning its
    outputs.

  Raises:
    ValueError: `model` is invalid (see `validation.check_model`), or has a
      random layer that cannot be reproduced (named in the message).
  """
  sources.check_dropout_model(model, allow_subclassed=True)
  return MCDropoutModel(model)
