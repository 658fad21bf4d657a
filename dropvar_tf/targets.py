"""Offline Monte Carlo dropout targets: the DPV a variation head learns.

The dropout prediction variation (DPV) of an example is the std, over
`num_samples` stochastic forward passes with dropout on, of the model's
prediction (see `dropvar_tf.contract` for the statistics). This module computes
it for a whole data set, fast and reproducibly:

* Only dropout is sampled. `mc_dropout_model` clones the graph, reusing every
  non-Dropout layer instance (weights shared, nothing copied) and replacing each
  `keras.layers.Dropout` (subclasses included) by `SeededDropout`. The clone is
  called with `training=False`, so BatchNormalization stays in inference mode
  and nothing in the base model is updated.
* The passes are compiled and tiled: each batch is repeated `samples_per_pass`
  times inside one `tf.function` call, and only float64 sums and sums of
  squares are kept on the host, never all T outputs.
* Masks are a pure function of numbers (see "Mask function" below), so the
  masks do not depend on batching, tiling, chunking, sharding or resuming: a
  distributed (e.g. Apache Beam) pipeline that feeds the same keys draws
  exactly the same masks. With the same batch shape the targets are
  bit-identical; across batch shapes they agree to float32 rounding (TF's
  matmul kernels round differently per shape), about 1e-7 relative.
* The mask hash (about 20 uint32 ops per unit) runs as one XLA-fused kernel
  inside `mc_dropout_targets`, so seeded masks cost less than Keras' own
  random dropout; the rest of the model keeps TF's kernels.

Mask function
-------------
For the dropout layer with index `layer_index` (its position in
`keras_graph.dropout_layers(model)`), example key `key` (int64), sample index
`t` in [0, num_samples) and unit index `unit` (the row-major flat index of the
unit in the per-example noise shape), with global `seed` in [0, 2**32):

    h = MurmurHash3_x86_32(words=[key & 0xffffffff, (key >> 32) & 0xffffffff,
                                  t, layer_index, unit],  seed=seed)
    keep = h >= floor(rate * 2**32)
    output = inputs * keep / (1 - rate)

`MurmurHash3_x86_32` is the reference MurmurHash3 over the 20 little-endian
bytes of the five uint32 words (as `mmh3.hash(bytes, seed, signed=False)`).
`mask_hash` evaluates it with numpy or TensorFlow; `row_states` gives the hash
state after the three per-row words, which is all a pipeline needs to feed.
The per-example noise shape is the layer's `noise_shape` without its batch
entry (None entries take the input's size; spatial dropouts share a mask over
their spatial axes), so every example and sample gets its own mask.

Example:

```python
targets = mc_dropout_targets(model, x, num_samples=100, seed=0)
stats = mc_convergence(model, x, num_samples=100)   # is T=100 enough?
```
"""

import collections
import hashlib
import json
import math
import os
import sys

import numpy as np

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

# Tiled rows per compiled call when `samples_per_pass` is automatic: large
# enough to amortise the call overhead, small enough that activations of a
# wide MLP stay well under a GiB.
TILE_ROWS = 16384
# Examples per resume chunk file (rounded up to a multiple of `batch_size`).
CHUNK_EXAMPLES = 8192
# `progress=None` shows a bar when num_examples * num_samples exceeds this.
PROGRESS_MIN_ROWS = 2_000_000

MANIFEST_FILENAME = "manifest.json"
_FORMAT_VERSION = 1

_U32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_N1 = 0xE6546B64
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35
_NUM_WORDS = 5


# ---------------------------------------------------------------------------
# Mask function (numpy and TensorFlow share one definition).


class _NumpyOps:
  """uint32 arithmetic on numpy arrays (wraps modulo 2**32)."""

  @staticmethod
  def u32(v):
    return np.asarray(v, dtype=np.uint32)

  xor = staticmethod(np.bitwise_xor)
  or_ = staticmethod(np.bitwise_or)

  @staticmethod
  def shl(a, r):
    return np.left_shift(a, np.uint32(r))

  @staticmethod
  def shr(a, r):
    return np.right_shift(a, np.uint32(r))

  @staticmethod
  def mul(a, c):
    return np.multiply(a, np.uint32(c), dtype=np.uint32)

  @staticmethod
  def add(a, c):
    return np.add(a, np.uint32(c), dtype=np.uint32)


class _TfOps:
  """uint32 arithmetic on TF tensors (wraps modulo 2**32)."""

  @staticmethod
  def u32(v):
    return tf.cast(v, tf.uint32) if tf.is_tensor(v) else tf.constant(
        v, tf.uint32)

  xor = staticmethod(tf.bitwise.bitwise_xor)
  or_ = staticmethod(tf.bitwise.bitwise_or)

  @staticmethod
  def shl(a, r):
    return tf.bitwise.left_shift(a, tf.constant(r, tf.uint32))

  @staticmethod
  def shr(a, r):
    return tf.bitwise.right_shift(a, tf.constant(r, tf.uint32))

  @staticmethod
  def mul(a, c):
    return a * tf.constant(c, tf.uint32)

  @staticmethod
  def add(a, c):
    return a + tf.constant(c, tf.uint32)


def _rotl(ops, a, r):
  return ops.or_(ops.shl(a, r), ops.shr(a, 32 - r))


def _kmix(ops, k):
  return ops.mul(_rotl(ops, ops.mul(k, _C1), 15), _C2)


def _block(ops, h, kmixed):
  """One MurmurHash3_x86_32 body step with an already mixed word."""
  h = _rotl(ops, ops.xor(h, kmixed), 13)
  return ops.add(ops.mul(h, 5), _N1)


def _fmix(ops, h):
  h = ops.xor(h, ops.shr(h, 16))
  h = ops.mul(h, _F1)
  h = ops.xor(h, ops.shr(h, 13))
  h = ops.mul(h, _F2)
  return ops.xor(h, ops.shr(h, 16))


def _split_keys(ops, keys):
  """int64 keys -> (low, high) uint32 words (two's complement)."""
  if ops is _NumpyOps:
    keys = np.asarray(keys, dtype=np.int64)
    return ((keys & _U32).astype(np.uint32),
            ((keys >> 32) & _U32).astype(np.uint32))
  keys = tf.cast(keys, tf.int64)
  mask = tf.constant(_U32, tf.int64)
  low = tf.bitwise.bitwise_and(keys, mask)
  high = tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(keys, tf.constant(32, tf.int64)), mask)
  return tf.cast(low, tf.uint32), tf.cast(high, tf.uint32)


def _row_states(ops, seed, keys, sample_index):
  low, high = _split_keys(ops, keys)
  h = ops.u32(seed)
  h = _block(ops, h, _kmix(ops, low))
  h = _block(ops, h, _kmix(ops, high))
  return _block(ops, h, _kmix(ops, ops.u32(sample_index)))


def _finish(ops, row_state, layer_index, unit_kmixed):
  """Hash of (row, layer, unit) from a row state and pre-mixed unit words."""
  h = _block(ops, row_state, _kmix(ops, ops.u32(layer_index)))
  h = _block(ops, h, unit_kmixed)
  return _fmix(ops, ops.xor(h, ops.u32(4 * _NUM_WORDS)))


def row_states(seed, keys, sample_index):
  """MurmurHash3 state after the per-row words (numpy reference).

  Args:
    seed: global seed, integer in [0, 2**32).
    keys: int64 array of example keys, any shape.
    sample_index: integer array broadcastable with `keys`: the sample index t.

  Returns:
    uint32 array of the broadcast shape.
  """
  keys, sample_index = np.broadcast_arrays(
      np.asarray(keys, np.int64), np.asarray(sample_index, np.int64))
  return _row_states(_NumpyOps, np.uint32(seed), keys,
                     sample_index.astype(np.uint32))


def mask_hash(seed, keys, sample_index, layer_index, unit_index):
  """The dropout mask hash, numpy reference (see the module docstring).

  Args:
    seed: global seed, integer in [0, 2**32).
    keys: int64 array of example keys.
    sample_index: integer array (sample index t), broadcastable with `keys`.
    layer_index: integer, position of the layer in
      `keras_graph.dropout_layers(model)`.
    unit_index: integer array of flat unit indices, broadcastable.

  Returns:
    uint32 array (broadcast shape): `MurmurHash3_x86_32` of the words
    `[key_low, key_high, t, layer_index, unit_index]` with `seed`.
  """
  states = row_states(seed, keys, sample_index)
  units = np.asarray(unit_index, np.int64).astype(np.uint32)
  return _finish(_NumpyOps, states, np.uint32(layer_index),
                 _kmix(_NumpyOps, units))


def keep_threshold(rate):
  """uint32 threshold: a unit is kept iff its mask hash >= this value."""
  return min(int(math.floor(float(rate) * 2.0**32)), _U32)


def keep_mask(seed, keys, sample_index, layer_index, unit_index, rate):
  """Boolean keep mask (numpy reference of what `SeededDropout` applies)."""
  if rate >= 1.0:
    return np.zeros(np.broadcast_shapes(
        np.shape(keys), np.shape(sample_index), np.shape(unit_index)), bool)
  h = mask_hash(seed, keys, sample_index, layer_index, unit_index)
  return h >= np.uint32(keep_threshold(rate))


def example_seeds(seed, keys, sample_index):
  """Per-row uint32 states a pipeline feeds to `SeededDropout`, in TF.

  Same numbers as `row_states`, computed with TF ops (usable in a graph).
  """
  return _row_states(_TfOps, _TfOps.u32(seed), keys,
                     _TfOps.u32(sample_index))


class _RowContext:
  """Per-row hash states seen by every SeededDropout call while active."""
  states = None


_CONTEXT = _RowContext()


class _row_context:  # pylint: disable=invalid-name
  """Makes `states` ((rows,) uint32) the row states of SeededDropout calls."""

  def __init__(self, states):
    self._states = states
    self._saved = None

  def __enter__(self):
    self._saved = _CONTEXT.states
    _CONTEXT.states = self._states

  def __exit__(self, *unused_exc):
    _CONTEXT.states = self._saved


def _apply_mask(inputs, states, unit_kmixed, layer_index, threshold, scale):
  """Inverted dropout with the hash mask; states broadcast against units."""
  h = _finish(_TfOps, states, layer_index, unit_kmixed)
  return tf.where(h >= threshold, inputs * scale, tf.zeros((), inputs.dtype))


# XLA fuses the ~20 integer ops of the hash into one loop over the units
# (about 2x faster on CPU than separate kernels), while the rest of the model
# keeps TF's own (oneDNN) kernels.
_apply_mask_xla = tf.function(_apply_mask, jit_compile=True)


@keras.saving.register_keras_serializable(package="dropvar_tf")
class SeededDropout(keras.layers.Layer):
  """Inverted dropout that is always on, with counter-based seeded masks.

  Inside `mc_dropout_targets` the mask of each row is the pure function of
  (seed, example key, sample index, `layer_index`, unit) given in the module
  docstring. Called on its own (e.g. through `mc_dropout_model(model)(x)`),
  each call draws a fresh salt from a `keras.random.SeedGenerator(seed)` and
  uses it as the sample index with the row position in the batch as key, so
  repeated calls give different, seed-reproducible masks, as Keras' Dropout.

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
      states = example_seeds(0 if self.seed is None else self.seed,
                             tf.range(rows, dtype=tf.int64),
                             tf.fill([rows], tf.cast(salt, tf.uint32)))
      # Plain ops here: a stand-alone model may be exported and served
      # where XLA is not available.
      apply = _apply_mask
    units = np.arange(int(np.prod(unit_shape, dtype=np.int64)),
                      dtype=np.uint32).reshape(unit_shape)
    unit_kmixed = tf.constant(_kmix(_NumpyOps, units)[None], tf.uint32)
    states = tf.reshape(states, [-1] + [1] * len(unit_shape))
    return apply(inputs, states, unit_kmixed,
                 tf.constant(self.layer_index, tf.uint32),
                 tf.constant(keep_threshold(self.rate), tf.uint32),
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


# ---------------------------------------------------------------------------
# Inputs.


def _model_input_ranks(model):
  return [len(t.shape) for t in model.inputs]


def _leaves(structure):
  return tf.nest.flatten(structure)


def _num_rows(structure):
  return int(np.shape(_leaves(structure)[0])[0])


def _check_structure(model, x, what):
  """Checks that x has as many leaves as `model` has inputs."""
  leaves = _leaves(x)
  if len(leaves) != len(model.inputs):
    raise validation.invalid(
        "x", f"{what} with one entry per model input "
        f"({len(model.inputs)}: {[t.name for t in model.inputs]})",
        f"{len(leaves)} entries")


class _ArraySource:
  """In-memory inputs: numpy array, list/tuple or dict of numpy arrays."""

  def __init__(self, model, x):
    if isinstance(x, dict):
      x = {k: np.asarray(v) for k, v in x.items()}
    elif isinstance(x, (list, tuple)):
      x = type(x)(np.asarray(v) for v in x)
    else:
      x = np.asarray(x)
    _check_structure(model, x, "an array, or a list or dict of arrays,")
    rows = {np.shape(v)[0] if np.ndim(v) else None for v in _leaves(x)}
    if len(rows) != 1 or None in rows:
      raise validation.invalid(
          "x", "arrays with the same number of rows (examples)",
          f"row counts {sorted(map(str, rows))}")
    self.x = x
    self.num_examples = rows.pop()

  def fingerprint(self):
    digest = hashlib.sha256(b"arrays")
    _hash_structure(digest, self.x)
    return digest.hexdigest()

  def chunks(self, chunk_rows):
    for start in range(0, self.num_examples, chunk_rows):
      stop = min(start + chunk_rows, self.num_examples)
      yield start, stop, tf.nest.map_structure(lambda v: v[start:stop],
                                               self.x)


class _DatasetSource:
  """A `tf.data.Dataset` of inputs, batched or unbatched (auto-detected)."""

  def __init__(self, model, dataset):
    spec = dataset.element_spec
    _check_structure(model, spec, "a Dataset of inputs only (no labels)")
    # Sorted: dict leaves come in key order, model inputs in graph order.
    spec_ranks = sorted(len(s.shape) for s in _leaves(spec))
    model_ranks = sorted(_model_input_ranks(model))
    if spec_ranks == model_ranks:
      dataset = dataset.unbatch()
    elif spec_ranks != [r - 1 for r in model_ranks]:
      raise validation.invalid(
          "x", f"a Dataset of examples of rank {[r - 1 for r in model_ranks]}"
          f" or batches of rank {model_ranks} (the model's inputs)",
          f"elements of rank {spec_ranks}")
    self.dataset = dataset
    self.spec = spec
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
      raise validation.invalid("x", "a finite Dataset", "an infinite Dataset")
    self.num_examples = cardinality if cardinality >= 0 else None

  def count(self):
    """Counts the examples with one pass over the data when unknown."""
    if self.num_examples is None:
      self.num_examples = int(self.dataset.reduce(
          tf.constant(0, tf.int64), lambda n, _: n + 1))
    return self.num_examples

  def fingerprint(self):
    # Hashing the data needs a full pass; each chunk file stores the digest
    # of its own inputs instead, checked when resuming.
    return "dataset:" + hashlib.sha256(
        repr(self.spec).encode()).hexdigest()

  def chunks(self, chunk_rows):
    start = 0
    for chunk in self.dataset.batch(chunk_rows).as_numpy_iterator():
      stop = start + _num_rows(chunk)
      yield start, stop, chunk
      start = stop


def _hash_structure(digest, x):
  """Feeds names, shapes, dtypes and bytes of every array of `x`."""
  if isinstance(x, dict):
    items = sorted(x.items())
  else:
    items = list(enumerate(_leaves(x)))
  for name, value in items:
    value = np.ascontiguousarray(value)
    digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())


def model_fingerprint(model):
  """sha256 of every weight (values, shapes, dtypes, in model order)."""
  digest = hashlib.sha256()
  for w in model.weights:
    value = np.ascontiguousarray(w.numpy())
    digest.update(f"{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _input_digest(x, keys):
  digest = hashlib.sha256()
  _hash_structure(digest, x)
  digest.update(np.ascontiguousarray(keys, np.int64).tobytes())
  return digest.hexdigest()


# ---------------------------------------------------------------------------
# Compiled sampling.


class _Sampler:
  """Compiled deterministic pass and tiled stochastic passes of one model.

  Built once per (model, samples_per_pass) and cached: seed and sample
  indices are tensor arguments, so later calls reuse the traced graphs.
  """

  def __init__(self, model, samples_per_pass):
    self.model = model
    self.clone = mc_dropout_model(model)
    self.samples_per_pass = samples_per_pass
    self.deterministic = tf.function(self._deterministic,
                                     reduce_retracing=True)
    self.sample_sums = tf.function(self._sample_sums, reduce_retracing=True)

  def _deterministic(self, x):
    y = self.model(x, training=False)
    return tf.reshape(y, [tf.shape(y)[0], -1])

  def _sample_sums(self, x, keys, shift, seed, first_sample, num_valid):
    """Sums over `samples_per_pass` tiled samples starting at `first_sample`.

    Args:
      x: input structure, (B, ...) leaves.
      keys: (B,) int64 example keys.
      shift: (B, k) float64, subtracted before summing (the deterministic
        prediction) so that sums of squares keep their precision.
      seed: uint32 scalar, the global seed.
      first_sample: int32 scalar, sample index of the first tile.
      num_valid: int32 scalar, tiles beyond it (past num_samples) are ignored.

    Returns:
      (sum, sum of squares) of the shifted outputs, each (B, k) float64.
    """
    s = self.samples_per_pass
    rows = tf.shape(keys)[0]
    tiled = tf.nest.map_structure(
        lambda v: tf.tile(v, [s] + [1] * (len(v.shape) - 1)), x)
    sample = tf.repeat(first_sample + tf.range(s), rows)
    states = example_seeds(seed, tf.tile(keys, [s]), sample)
    with _row_context(states):
      y = self.clone(tiled, training=False)
    y = tf.reshape(tf.cast(y, tf.float64), [s, rows, -1]) - shift[None]
    weight = tf.cast(tf.range(s) < num_valid, tf.float64)[:, None, None]
    y = y * weight
    return tf.reduce_sum(y, axis=0), tf.reduce_sum(tf.square(y), axis=0)

  def moments(self, x, keys, seed, sample_start, sample_stop):
    """Deterministic output and float64 moment sums for one batch.

    Returns:
      (det, s1, s2): (B, k) deterministic prediction and sums of (y - det)
      and (y - det)**2 over samples [sample_start, sample_stop).
    """
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    keys = tf.convert_to_tensor(keys, tf.int64)
    det = self.deterministic(x).numpy().astype(np.float64)
    shift = tf.constant(det)
    seed = tf.constant(seed, tf.uint32)
    s1 = np.zeros_like(det)
    s2 = np.zeros_like(det)
    for t in range(sample_start, sample_stop, self.samples_per_pass):
      valid = min(self.samples_per_pass, sample_stop - t)
      a, b = self.sample_sums(x, keys, shift, seed, tf.constant(t, tf.int32),
                              tf.constant(valid, tf.int32))
      s1 += a.numpy()
      s2 += b.numpy()
    return det, s1, s2


# Recently used samplers, keyed by model identity; a few only, since each
# holds its model (and traced graphs) alive.
_SAMPLERS = collections.OrderedDict()
_MAX_SAMPLERS = 4


def _sampler_for(model, samples_per_pass):
  key = (id(model), samples_per_pass)
  sampler = _SAMPLERS.get(key)
  if sampler is None or sampler.model is not model:
    sampler = _Sampler(model, samples_per_pass)
    _SAMPLERS[key] = sampler
    while len(_SAMPLERS) > _MAX_SAMPLERS:
      _SAMPLERS.popitem(last=False)
  _SAMPLERS.move_to_end(key)
  return sampler


def _std_from_sums(s1, s2, n):
  mean = s1 / n
  return np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))


def _reduce(std, det, statistic, out_shape):
  """Applies the DPV statistic to per-unit stds (N, k)."""
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    cls = np.argmax(det, axis=-1)
    return std[np.arange(std.shape[0]), cls].astype(np.float32)
  if std.shape[1] == 1:
    return std[:, 0].astype(np.float32)
  return std.reshape((std.shape[0],) + tuple(out_shape)).astype(np.float32)


# ---------------------------------------------------------------------------
# Validation.


def _check_common(model, num_samples, seed, batch_size, statistic):
  validation.check_model(model)
  if len(model.outputs) != 1:
    raise validation.invalid(
        "model", "a model with a single output tensor",
        f"model {model.name!r} with {len(model.outputs)} outputs")
  num_samples = validation.check_int(num_samples, "num_samples", 2)
  seed = validation.check_int(seed, "seed", 0)
  if seed > _U32:
    raise validation.invalid("seed", "an integer in [0, 2**32)", seed)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  validation.resolve_statistic(statistic, 1)  # validate before the model
  out_shape = tuple(model.outputs[0].shape[1:])
  if any(d is None for d in out_shape):
    raise validation.invalid("model", "a model with a static output shape",
                             f"output shape {model.outputs[0].shape}")
  units = int(np.prod(out_shape, dtype=np.int64))
  statistic = validation.resolve_statistic(
      statistic, units, keras_graph.output_is_probabilities(model))
  return num_samples, seed, batch_size, statistic, out_shape


def _make_source(model, x):
  if x is None:
    raise validation.invalid(
        "x", "a numpy array, a list or dict of arrays, or a tf.data.Dataset",
        x)
  if isinstance(x, tf.data.Dataset):
    return _DatasetSource(model, x)
  return _ArraySource(model, x)


def _check_keys(keys, num_examples):
  if keys is None:
    return None
  keys = np.asarray(keys)
  if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer) or (
      num_examples is not None and keys.shape[0] != num_examples):
    raise validation.invalid(
        "keys", f"a 1-D integer array with one key per example "
        f"({num_examples})", f"array of dtype {keys.dtype} and shape "
        f"{keys.shape}")
  if keys.dtype == np.uint64 and keys.size and keys.max() > np.iinfo(
      np.int64).max:
    raise validation.invalid("keys", "int64 keys", "uint64 keys >= 2**63")
  return keys.astype(np.int64)


def _auto_samples_per_pass(samples_per_pass, num_samples, batch_rows):
  if samples_per_pass is None:
    limit = max(1, min(num_samples, TILE_ROWS // max(1, batch_rows)))
  else:
    limit = min(num_samples, validation.check_int(
        samples_per_pass, "samples_per_pass", 1))
  # Even tiles: T=100 with room for 64 runs 2 x 50, not 64 + 36.
  passes = -(-num_samples // limit)
  return -(-num_samples // passes)


def _progress_bar(progress, num_examples, num_samples, desc):
  if progress is None:
    progress = (num_examples or 0) * num_samples >= PROGRESS_MIN_ROWS
  if not progress:
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=num_examples, unit="ex", desc=desc, file=sys.stderr)


# ---------------------------------------------------------------------------
# The engine: chunks of examples, batches inside, moments per sample range.


def _pad_rows(x, keys, rows):
  """Repeats the last row so the batch has `rows` rows (one trace only)."""
  n = keys.shape[0]
  if n == rows:
    return x, keys
  idx = np.concatenate([np.arange(n), np.full(rows - n, n - 1)])
  return tf.nest.map_structure(lambda v: v[idx], x), keys[idx]


def _compute_chunk(sampler, x, keys, seed, batch_rows, sample_ranges):
  """Moments of one chunk of examples for each (start, stop) sample range.

  Returns:
    (det, [(s1, s2), ...]) with (n, k) float64 arrays.
  """
  n = keys.shape[0]
  dets, sums = [], [([], []) for _ in sample_ranges]
  for b in range(0, n, batch_rows):
    stop = min(b + batch_rows, n)
    xb, kb = _pad_rows(tf.nest.map_structure(lambda v: v[b:stop], x),
                       keys[b:stop], batch_rows)
    for (start, end), (l1, l2) in zip(sample_ranges, sums):
      det, s1, s2 = sampler.moments(xb, kb, seed, start, end)
      l1.append(s1[:stop - b])
      l2.append(s2[:stop - b])
    dets.append(det[:stop - b])
  return np.concatenate(dets), [(np.concatenate(a), np.concatenate(b))
                                for a, b in sums]


def _run(model, source, num_samples, seed, batch_size, keys,
         samples_per_pass, progress, sample_ranges, desc, on_chunk=None,
         chunk_rows=None):
  """Yields (index, start, stop, x, keys, result) per chunk of examples.

  `result` is `on_chunk(index, start, stop, x, keys)` when that is not None
  (a reused chunk), else `_compute_chunk(...)`.
  """
  batch_rows = batch_size
  if source.num_examples is not None:
    batch_rows = max(1, min(batch_size, source.num_examples))
  spp = _auto_samples_per_pass(samples_per_pass, num_samples, batch_rows)
  sampler = _sampler_for(model, spp)
  bar = _progress_bar(progress, source.num_examples, num_samples, desc)
  chunk_rows = chunk_rows or batch_size * max(1, -(-CHUNK_EXAMPLES //
                                                   batch_size))
  try:
    for index, (start, stop, xc) in enumerate(source.chunks(chunk_rows)):
      if keys is None:
        kc = np.arange(start, stop, dtype=np.int64)
      else:
        if stop > keys.shape[0]:
          raise validation.invalid(
              "keys", "one key per example", f"{keys.shape[0]} keys for at "
              f"least {stop} examples")
        kc = keys[start:stop]
      result = on_chunk(index, start, stop, xc, kc) if on_chunk else None
      if result is None:
        result = _compute_chunk(sampler, xc, kc, seed, batch_rows,
                                sample_ranges)
      yield index, start, stop, xc, kc, result
      if bar is not None:
        bar.update(stop - start)
  finally:
    if bar is not None:
      bar.close()


def _finalize(det, sums, num_samples, statistic, out_shape):
  s1, s2 = sums
  return _reduce(_std_from_sums(s1, s2, num_samples), det, statistic,
                 out_shape)


# ---------------------------------------------------------------------------
# Resume files.


def _chunk_path(output_path, index):
  return os.path.join(output_path, f"chunk_{index:06d}.npz")


def _atomic_write(path, write):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _chunk_digest(settings_digest, start, stop, input_digest, values):
  digest = hashlib.sha256(settings_digest.encode())
  digest.update(f"|{start}|{stop}|{input_digest}|".encode())
  values = np.ascontiguousarray(values)
  digest.update(f"{values.dtype.str}|{values.shape}|".encode())
  digest.update(values.tobytes())
  return digest.hexdigest()


def _write_chunk(output_path, index, settings_digest, start, stop,
                 input_digest, values):
  digest = _chunk_digest(settings_digest, start, stop, input_digest, values)

  def write(f):
    np.savez(f, values=values, start=start, stop=stop,
             input_digest=np.array(input_digest),
             digest=np.array(digest))

  _atomic_write(_chunk_path(output_path, index), write)


def _read_chunk(output_path, index, settings_digest, start, stop):
  """Returns (values, input_digest) of a valid chunk file, else None."""
  path = _chunk_path(output_path, index)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      values = data["values"]
      input_digest = str(data["input_digest"])
      digest = str(data["digest"])
      if int(data["start"]) != start or int(data["stop"]) != stop:
        return None
  except Exception:  # pylint: disable=broad-except
    # Truncated or corrupted files raise many error types (zip, npy, EOF);
    # any of them means "recompute", never "use".
    return None
  if digest != _chunk_digest(settings_digest, start, stop, input_digest,
                             values):
    return None
  return values, input_digest


def _prepare_output(output_path, settings):
  """Writes or checks the manifest; returns (chunk_rows, settings digest)."""
  os.makedirs(output_path, exist_ok=True)
  manifest_path = os.path.join(output_path, MANIFEST_FILENAME)
  stored = None
  if os.path.exists(manifest_path):
    try:
      with open(manifest_path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = None  # A torn manifest is rewritten; chunks are re-verified.
  if stored is not None:
    for name, value in settings.items():
      if name == "chunk_rows":
        continue
      if stored.get(name) != value:
        raise validation.invalid(
            "output_path", f"a resume directory written with the same "
            f"settings; its `{name}` is {stored.get(name)!r}, this run's is "
            f"{value!r}", output_path)
    settings = dict(settings, chunk_rows=stored["chunk_rows"])
  else:
    text = json.dumps(settings, indent=2, sort_keys=True)
    _atomic_write(manifest_path, lambda f: f.write(text.encode()))
  digest = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode()).hexdigest()
  return settings["chunk_rows"], digest


# ---------------------------------------------------------------------------
# Public API.


def mc_dropout_targets(model, x, num_samples=100, seed=0, batch_size=256,
                       statistic="auto", keys=None, output_path=None,
                       progress=None, samples_per_pass=None):
  """Computes MC-dropout DPV targets for every example of `x`.

  Runs `num_samples` stochastic passes (dropout on with the model's rates,
  everything else in inference mode, `model` untouched) and returns the std
  over passes per example. Passes are compiled and tiled; only float64 sums
  are accumulated.

  Args:
    model: built Functional or Sequential `keras.Model` with Dropout and one
      output tensor of shape (batch, k) (or (batch,)).
    x: the inputs, no labels: a numpy array (N, ...), a list or dict of
      arrays (named inputs, e.g. int64 `user_id`/`movie_id`), or a
      `tf.data.Dataset` yielding single examples or batches (told apart by
      rank against the model's inputs; rebatched to `batch_size`).
    num_samples: integer >= 2, T.
    seed: integer in [0, 2**32), the global seed of the mask function.
    batch_size: examples per compiled call (before tiling).
    statistic: one of `contract.STATISTICS`; "auto" is "std" for one output
      unit and "predicted_class_std" otherwise.
    keys: optional (N,) int64 example keys (default: row index 0..N-1).
      Masks depend on (seed, key, sample, layer, unit) only: give matching
      keys to reproduce a part of `x` in another call or shard.
    output_path: optional directory for resumable chunk files and a manifest;
      re-running with the same settings reuses valid chunks.
    progress: show a tqdm bar (None: only for long runs).
    samples_per_pass: tiles per compiled call (None: as many as fit in
      `TILE_ROWS` rows, balanced over the passes).

  Returns:
    float32 array: (N,) for "std" with one output unit and for
    "predicted_class_std"; (N, k) for "std"/"per_class_std" with k > 1.
    Population std (ddof=0).

  Raises:
    ValueError: an invalid argument (named in the message), or an
      `output_path` written with other settings.
  """
  num_samples, seed, batch_size, statistic, out_shape = _check_common(
      model, num_samples, seed, batch_size, statistic)
  source = _make_source(model, x)
  if output_path is not None and isinstance(source, _DatasetSource):
    source.count()
  keys = _check_keys(keys, source.num_examples)
  ranges = [(0, num_samples)]
  if output_path is None:
    parts = []
    stop = 0
    for _, _, stop, _, _, (det, sums) in _run(
        model, source, num_samples, seed, batch_size, keys, samples_per_pass,
        progress, ranges, "MC dropout"):
      parts.append(_finalize(det, sums[0], num_samples, statistic, out_shape))
    _check_keys_used(keys, stop)
    return _concat(parts, out_shape, statistic)

  output_path = os.fspath(output_path)
  n = source.num_examples
  settings = {
      "format_version": _FORMAT_VERSION,
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "num_examples": n,
      "keys_hash": hashlib.sha256(
          (np.arange(n, dtype=np.int64) if keys is None else keys).tobytes()
      ).hexdigest(),
      "model_fingerprint": model_fingerprint(model),
      "data_fingerprint": source.fingerprint(),
      "output_shape": list(out_shape),
      "chunk_rows": batch_size * max(1, -(-CHUNK_EXAMPLES // batch_size)),
  }
  chunk_rows, settings_digest = _prepare_output(output_path, settings)
  found = {}

  def reuse(index, start, stop, xc, kc):
    stored = _read_chunk(output_path, index, settings_digest, start, stop)
    if stored is None:
      return None
    values, input_digest = stored
    if input_digest != _input_digest(xc, kc):
      raise validation.invalid(
          "x", f"the input data of the run that wrote {output_path!r} "
          f"(examples {start}:{stop} differ)", "other input data")
    found[index] = values
    return ()

  parts = []
  for index, start, stop, xc, kc, result in _run(
      model, source, num_samples, seed, batch_size, keys, samples_per_pass,
      progress, ranges, "MC dropout", on_chunk=reuse, chunk_rows=chunk_rows):
    if index in found:
      parts.append(found.pop(index))
      continue
    det, sums = result
    values = _finalize(det, sums[0], num_samples, statistic, out_shape)
    _write_chunk(output_path, index, settings_digest, start, stop,
                 _input_digest(xc, kc), values)
    parts.append(values)
  return _concat(parts, out_shape, statistic)


def _check_keys_used(keys, num_examples):
  if keys is not None and keys.shape[0] != num_examples:
    raise validation.invalid(
        "keys", f"one key per example ({num_examples})",
        f"{keys.shape[0]} keys")


def _concat(parts, out_shape, statistic):
  if parts:
    return np.concatenate(parts).astype(np.float32)
  units = int(np.prod(out_shape, dtype=np.int64))
  shape = (0,) if statistic == contract.STAT_PREDICTED_CLASS_STD or (
      units == 1) else (0,) + tuple(out_shape)
  return np.zeros(shape, np.float32)


def _ranks(values):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats.rankdata(values)


def _pearson(a, b):
  a = a - a.mean()
  b = b - b.mean()
  denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
  return float(np.dot(a, b) / denom) if denom > 0 else float("nan")


def mc_convergence(model, x, num_samples=100, seed=0, batch_size=256,
                   statistic="auto", keys=None):
  """How stable the DPV estimate is at `num_samples` (split-half reliability).

  The T samples are split into two independent halves (samples [0, T//2) and
  [T//2, T)); each gives a DPV estimate. Their agreement measures sampling
  noise; the full-T estimate (identical to `mc_dropout_targets` with the same
  arguments) is more reliable than either half by the Spearman-Brown formula.

  For the "noise ceiling" of a head trained on these targets, compare two
  independent full-T runs with different seeds: `noise_ceiling(...)`. No
  predictor of the targets can correlate with them better than they
  correlate with themselves.

  Args:
    model, x, num_samples, seed, batch_size, statistic, keys: as in
      `mc_dropout_targets` (`num_samples` >= 4 so that halves have 2 samples).

  Returns:
    dict with "pearson" and "spearman" (between the halves' DPVs, all values
    flattened), "reliability" (Spearman-Brown corrected Pearson of the full-T
    estimate: 2r / (1 + r)), "mean_relative_std_error" (root-mean-square over
    values with positive DPV of |half_a - half_b| / (2 * dpv_full), an
    estimate of the relative standard error of the full-T DPV),
    "num_samples" and "num_examples".

  Raises:
    ValueError: an invalid argument, named in the message.
  """
  num_samples, seed, batch_size, statistic, out_shape = _check_common(
      model, num_samples, seed, batch_size, statistic)
  num_samples = validation.check_int(num_samples, "num_samples", 4)
  source = _make_source(model, x)
  keys = _check_keys(keys, source.num_examples)
  half = num_samples // 2
  ranges = [(0, half), (half, num_samples)]
  a_parts, b_parts, full_parts = [], [], []
  stop = 0
  for _, _, stop, _, _, (det, (sa, sb)) in _run(
      model, source, num_samples, seed, batch_size, keys, None, False, ranges,
      "MC convergence"):
    a_parts.append(_finalize(det, sa, half, statistic, out_shape))
    b_parts.append(_finalize(det, sb, num_samples - half, statistic,
                             out_shape))
    full = (sa[0] + sb[0], sa[1] + sb[1])
    full_parts.append(_finalize(det, full, num_samples, statistic, out_shape))
  _check_keys_used(keys, stop)
  a = _concat(a_parts, out_shape, statistic).astype(np.float64).ravel()
  b = _concat(b_parts, out_shape, statistic).astype(np.float64).ravel()
  full = _concat(full_parts, out_shape, statistic).astype(np.float64).ravel()
  r = _pearson(a, b)
  rho = _pearson(_ranks(a), _ranks(b)) if a.size else float("nan")
  positive = full > 0
  rel = (np.abs(a - b)[positive] / (2.0 * full[positive]))
  return {
      "pearson": r,
      "spearman": rho,
      "reliability": 2.0 * r / (1.0 + r) if r > -1 else float("nan"),
      "mean_relative_std_error": float(np.sqrt(np.mean(rel * rel)))
                                 if rel.size else float("nan"),
      "num_samples": num_samples,
      "num_examples": int(stop),
  }


def noise_ceiling(model, x, num_samples=100, seeds=(0, 1), **kwargs):
  """Two independent full-T target arrays (different seeds).

  Their correlation is the noise ceiling of any predictor of the targets:
  `np.corrcoef(a.ravel(), b.ravel())[0, 1]`.

  Args:
    model, x, num_samples: as in `mc_dropout_targets`.
    seeds: two different seeds.
    **kwargs: other `mc_dropout_targets` arguments (not `seed`).

  Returns:
    (targets_a, targets_b), each as returned by `mc_dropout_targets`.

  Raises:
    ValueError: `seeds` is not two different integers, or another invalid
      argument.
  """
  if (not isinstance(seeds, (list, tuple)) or len(seeds) != 2 or
      seeds[0] == seeds[1]):
    raise validation.invalid("seeds", "two different integer seeds", seeds)
  return tuple(mc_dropout_targets(model, x, num_samples=num_samples, seed=s,
                                  **kwargs) for s in seeds)
