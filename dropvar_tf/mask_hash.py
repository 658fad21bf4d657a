"""The dropout mask function: a counter-based MurmurHash3 of five numbers.

Every Monte Carlo dropout mask of the library (`seeded_dropout.SeededDropout`
inside `targets.mc_dropout_targets`, the SavedModel's MC signature, the Beam
targets pipeline) is a pure function of numbers, specified here. Masks
therefore do not depend on batching, tiling, chunking, sharding or resuming:
a distributed pipeline that feeds the same keys draws exactly the same masks.

The hash is written out with uint32 ops rather than taken from TF's stateless
random ops: those draw one stream per call, so a row's mask would depend on
the batch it sits in. One definition serves numpy (the reference, and what
a pipeline can recompute) and TensorFlow (what the layers run).

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
`mask_hash` evaluates it with numpy; `row_states` gives the hash state after
the three per-row words, which is all a pipeline needs to feed, and
`example_seeds` the same states with TF ops. The per-example noise shape is
the layer's `noise_shape` without its batch entry (None entries take the
input's size; spatial dropouts share a mask over their spatial axes), so
every example and sample gets its own mask.

Other dropout sources
---------------------
Every source of `sources.find_sources(model)` hashes with its own
`layer_index` (its position in that list; for models whose only sources are
Dropout layers that is their position in `keras_graph.dropout_layers`). An
RNN's `dropout` and `recurrent_dropout` are two sources; their unit is the
flat index into one step's input (respectively state), and the mask is the
same at every step of a sequence. Sources other than Dropout turn `h` into

    uniform = ((h >> 9) + 0.5) / 2**23          # in (0, 1), float32 exact

- GaussianDropout: `inputs * (1 + sqrt(rate / (1 - rate)) * ndtri(uniform))`,
  the N(1, rate / (1 - rate)) noise of Keras by the inverse normal CDF;
- AlphaDropout: `keep = h >= floor(rate * 2**32)` in Keras' affine formula;
- registered sources: `uniform` of the input's shape, given to their noise
  function.

Example:

```python
h = mask_hash(seed=0, keys=np.arange(4), sample_index=0, layer_index=0,
              unit_index=np.arange(8)[:, None])        # (8, 4) uint32
keep = keep_mask(0, np.arange(4), 0, 0, np.arange(8)[:, None], rate=0.3)
```
"""

import math

import numpy as np

from dropvar_tf._keras import tf

_U32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_N1 = 0xE6546B64
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35
_NUM_WORDS = 5


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
  return _finish(_NumpyOps, states, np.uint32(layer_index),
                 mixed_units(unit_index))


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

  Args:
    seed: global seed, integer or uint32 scalar tensor in [0, 2**32).
    keys: int64 tensor of example keys.
    sample_index: integer tensor of the shape of `keys`: the sample index t.

  Returns:
    uint32 tensor of the shape of `keys`.
  """
  return _row_states(_TfOps, _TfOps.u32(seed), keys,
                     _TfOps.u32(sample_index))


def mixed_units(unit_index):
  """The unit words after MurmurHash3's per-word mix (numpy).

  A layer's unit indices never change, so they are mixed once, outside the
  graph, and passed to `finish_hash` as a constant.

  Args:
    unit_index: integer array of flat unit indices in [0, 2**32).

  Returns:
    uint32 array of the shape of `unit_index`.
  """
  units = np.asarray(unit_index, np.int64).astype(np.uint32)
  return _kmix(_NumpyOps, units)


def mixed_units_tf(unit_index):
  """`mixed_units` with TF ops, for unit shapes known only at run time.

  Args:
    unit_index: integer tensor of flat unit indices in [0, 2**32).

  Returns:
    uint32 tensor of the shape of `unit_index`, equal to
    `mixed_units(unit_index)`.
  """
  return _kmix(_TfOps, _TfOps.u32(unit_index))


def uniform_from_hash(h):
  """float32 uniforms in (0, 1) from mask hashes (see the module docstring).

  The top 23 bits of `h`, plus one half, are exact in float32 (24
  significant bits), so no value is 0 or 1: they lie in [2**-24, 1 - 2**-24].

  Args:
    h: uint32 tensor of mask hashes.

  Returns:
    float32 tensor of the shape of `h`.
  """
  top = tf.cast(tf.bitwise.right_shift(h, tf.constant(9, tf.uint32)),
                tf.float32)
  return (top + 0.5) * (1.0 / 2.0**23)


def finish_hash(states, layer_index, mixed_unit_words):
  """The mask hash from row states and mixed unit words, in TF.

  `finish_hash(example_seeds(seed, keys, t), layer_index, mixed_units(unit))`
  equals `mask_hash(seed, keys, t, layer_index, unit)`.

  Args:
    states: uint32 tensor of row states (`example_seeds`).
    layer_index: uint32 scalar tensor or integer, the layer's index.
    mixed_unit_words: uint32 tensor (`mixed_units`), broadcastable with
      `states`.

  Returns:
    uint32 tensor of the broadcast shape.
  """
  return _finish(_TfOps, states, layer_index, mixed_unit_words)
