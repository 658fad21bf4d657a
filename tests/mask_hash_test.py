"""Tests for dropvar_tf.mask_hash: the mask function against `mmh3`."""

import struct

import mmh3
import numpy as np

from dropvar_tf import mask_hash
from dropvar_tf._keras import tf

_M32 = 0xFFFFFFFF


def _random_words(num, seed=0):
  """(seed, key, t, layer, unit) tuples over the full range of each word."""
  rng = np.random.default_rng(seed)
  seeds = rng.integers(0, 2**32, num, dtype=np.uint64)
  keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, num,
                      dtype=np.int64, endpoint=True)
  # Small values too, as the library uses them: row indices, T, layers.
  keys[:num // 4] = rng.integers(-5, 1000, num // 4)
  t = rng.integers(0, 2**32, num, dtype=np.uint64)
  t[:num // 4] = rng.integers(0, 200, num // 4)
  layer = rng.integers(0, 2**32, num, dtype=np.uint64)
  layer[:num // 4] = rng.integers(0, 8, num // 4)
  unit = rng.integers(0, 2**32, num, dtype=np.uint64)
  return [(int(s), int(k), int(ti), int(l), int(u))
          for s, k, ti, l, u in zip(seeds, keys, t, layer, unit)]


def _mmh3(seed, key, t, layer, unit):
  """MurmurHash3_x86_32 of the five words as 20 little-endian bytes."""
  data = struct.pack("<5I", key & _M32, (key >> 32) & _M32, t, layer, unit)
  return mmh3.hash(data, seed, signed=False)


class MaskHashTest(tf.test.TestCase):

  def test_numpy_hash_is_mmh3_of_the_five_words(self):
    for seed, key, t, layer, unit in _random_words(2000):
      self.assertEqual(
          int(mask_hash.mask_hash(seed, key, t, layer, unit)),
          _mmh3(seed, key, t, layer, unit), msg=(seed, key, t, layer, unit))

  def test_numpy_hash_broadcasts(self):
    # Many units of many rows in one call, as a pipeline evaluates it.
    seed, t, layer = 12345, 7, 2
    keys = np.array([0, 1, -1, 2**40 + 3, -(2**63)], np.int64)
    units = np.arange(50, dtype=np.int64)
    got = mask_hash.mask_hash(seed, keys[:, None], t, layer, units[None, :])
    self.assertEqual(got.shape, (5, 50))
    self.assertEqual(got.dtype, np.uint32)
    expected = [[_mmh3(seed, int(k), t, layer, int(u)) for u in units]
                for k in keys]
    self.assertAllEqual(got, np.array(expected, np.uint32))

  def test_tf_hash_is_mmh3_of_the_five_words(self):
    # The path the layers run: TF row states, then TF finish per unit. Seed
    # and layer are scalars per call, so draw a few of each and group.
    words = _random_words(2000, seed=1)
    few = words[:6]
    by_seed_and_layer = {}
    for i, (_, key, t, _, unit) in enumerate(words):
      seed, layer = few[i % 6][0], few[i % 4][3]
      by_seed_and_layer.setdefault((seed, layer), []).append((key, t, unit))
    for (seed, layer), rows in by_seed_and_layer.items():
      keys = tf.constant([k for k, _, _ in rows], tf.int64)
      t = tf.constant([ti for _, ti, _ in rows], tf.uint32)
      units = np.array([u for _, _, u in rows], np.int64)
      states = mask_hash.example_seeds(seed, keys, t)
      got = mask_hash.finish_hash(
          states, tf.constant(layer, tf.uint32),
          tf.constant(mask_hash.mixed_units(units), tf.uint32))
      expected = [_mmh3(seed, k, ti, layer, u) for k, ti, u in rows]
      self.assertAllEqual(got.numpy(), np.array(expected, np.uint32))

  def test_tf_row_states_match_numpy(self):
    keys = np.array([0, 1, -1, 2**40 + 3], np.int64)
    t = np.array([0, 5, 9, 1], np.int32)
    self.assertAllEqual(mask_hash.example_seeds(11, keys, t).numpy(),
                        mask_hash.row_states(11, keys, t))

  def test_tf_unit_words_match_numpy(self):
    units = np.arange(50, dtype=np.int64).reshape(5, 10)
    self.assertAllEqual(mask_hash.mixed_units_tf(tf.constant(units)),
                        mask_hash.mixed_units(units))

  def test_uniforms_are_inside_the_open_unit_interval(self):
    h = tf.constant([0, 511, 512, 2**31, 2**32 - 1], tf.uint32)
    u = mask_hash.uniform_from_hash(h).numpy()
    self.assertEqual(u.dtype, np.float32)
    expected = (np.array([0, 0, 1, 2**22, 2**23 - 1]) + 0.5) / 2.0**23
    self.assertAllEqual(u, expected.astype(np.float32))
    self.assertAllEqual(u.astype(np.float64), expected)  # exact
    self.assertTrue(np.all((u > 0) & (u < 1)))

  def test_keep_threshold(self):
    self.assertEqual(mask_hash.keep_threshold(0.0), 0)
    self.assertEqual(mask_hash.keep_threshold(0.5), 2**31)
    self.assertEqual(mask_hash.keep_threshold(0.25), 2**30)
    self.assertEqual(mask_hash.keep_threshold(1.0), _M32)

  def test_keep_fraction_matches_rate(self):
    keep = mask_hash.keep_mask(3, np.arange(200)[:, None], 0, 0,
                               np.arange(500)[None, :], rate=0.3)
    self.assertAllClose(keep.mean(), 0.7, atol=0.01)
    self.assertTrue(mask_hash.keep_mask(3, 1, 0, 0, np.arange(10), 0.0).all())
    self.assertFalse(
        mask_hash.keep_mask(3, 1, 0, 0, np.arange(10), 1.0).any())

  def test_keep_mask_is_the_hash_against_the_threshold(self):
    keys, units = np.arange(30)[:, None], np.arange(40)[None, :]
    h = mask_hash.mask_hash(9, keys, 4, 1, units)
    self.assertAllEqual(mask_hash.keep_mask(9, keys, 4, 1, units, 0.4),
                        h >= mask_hash.keep_threshold(0.4))

  def test_every_word_changes_the_hash(self):
    base = (5, 17, 3, 1, 8)
    reference = int(mask_hash.mask_hash(*base))
    for position in range(5):
      changed = list(base)
      changed[position] += 1
      self.assertNotEqual(int(mask_hash.mask_hash(*changed)), reference,
                          msg=position)


if __name__ == "__main__":
  tf.test.main()
