"""Tests for dropvar_tf.targets."""

import json
import os
import tempfile
from unittest import mock

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

_M32 = 0xFFFFFFFF

# Expected error messages, stored once.
_ERR_NUM_SAMPLES = ("Invalid value received for argument `num_samples`. "
                    "Expected an integer >= 2. Received: num_samples=1")
_ERR_BATCH_SIZE = ("Invalid value received for argument `batch_size`. "
                   "Expected an integer >= 1. Received: batch_size=0")
_ERR_SAMPLES_PER_PASS = (
    "Invalid value received for argument `samples_per_pass`. Expected an "
    "integer >= 1. Received: samples_per_pass=0")
_ERR_STATISTIC = (
    "Invalid value received for argument `statistic`. Expected one of "
    "('auto', 'std', 'predicted_class_std', 'per_class_std'). Received: "
    "statistic='var'")
_ERR_SEED = ("Invalid value received for argument `seed`. Expected an "
             "integer >= 0. Received: seed=-1")
_ERR_KEYS = ("Invalid value received for argument `keys`. Expected a 1-D "
             "integer array with one key per example (12). Received: "
             "keys='array of dtype int64 and shape (11,)'")
_ERR_MODEL_NONE = ("Invalid value received for argument `model`. Expected a "
                   "built Functional or Sequential `keras.Model`. Received: "
                   "model=None")
_ERR_NO_DROPOUT = "model 'no_dropout' without Dropout layers"
_ERR_X_NONE = ("Invalid value received for argument `x`. Expected a numpy "
               "array, a list or dict of arrays, or a tf.data.Dataset. "
               "Received: x=None")
_ERR_SEEDS = ("Invalid value received for argument `seeds`. Expected two "
              "different integer seeds. Received: seeds=(3, 3)")
_ERR_RESUME = ("Invalid value received for argument `output_path`. Expected "
               "a resume directory written with the same settings; its "
               "`{name}` is")


def _murmur3_x86_32(data, seed):
  """Reference MurmurHash3_x86_32 over bytes (Austin Appleby's algorithm)."""
  h = seed & _M32
  rotl = lambda v, r: ((v << r) | (v >> (32 - r))) & _M32
  blocks = len(data) // 4
  for i in range(blocks):
    k = int.from_bytes(data[4 * i:4 * i + 4], "little")
    k = rotl((k * 0xCC9E2D51) & _M32, 15) * 0x1B873593 & _M32
    h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & _M32
  tail = data[4 * blocks:]
  k = 0
  for i, byte in reversed(list(enumerate(tail))):
    k ^= byte << (8 * i)
  if tail:
    k = rotl((k * 0xCC9E2D51) & _M32, 15) * 0x1B873593 & _M32
    h ^= k
  h ^= len(data)
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & _M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & _M32
  return h ^ (h >> 16)


def build_model(kind, rate=0.3, seed=0):
  """Tiny test models (seeded weights)."""
  keras.utils.set_random_seed(seed)
  if kind in ("regression", "binary", "softmax", "bn"):
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inputs)
    if kind == "bn":
      h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(rate)(h)
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.Dropout(rate)(h)
    units, act = {"regression": (1, None), "binary": (1, "sigmoid"),
                  "softmax": (3, "softmax"), "bn": (1, None)}[kind]
    return keras.Model(inputs, keras.layers.Dense(units, act)(h), name=kind)
  if kind == "sequential":
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(rate), keras.layers.Dense(1)], name=kind)
  if kind == "nested":
    inner = keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(rate)], name="inner")
    inputs = keras.Input((6,))
    h = keras.layers.Dropout(rate)(keras.layers.Dense(16, "relu")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, "softmax")(inner(h)),
                       name=kind)
  if kind == "dict":
    user = keras.Input((), dtype="int64", name="user_id")
    movie = keras.Input((), dtype="int64", name="movie_id")
    u = keras.layers.Embedding(20, 4)(user)
    m = keras.layers.Embedding(30, 4)(movie)
    h = keras.layers.Dense(8, activation="relu")(
        keras.layers.Concatenate()([u, m]))
    h = keras.layers.Dropout(rate)(h)
    return keras.Model({"user_id": user, "movie_id": movie},
                       keras.layers.Dense(1)(h), name=kind)
  if kind == "conv":
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.SpatialDropout2D(rate)(h)
    h = keras.layers.Dropout(rate)(keras.layers.Flatten()(h))
    return keras.Model(inputs, keras.layers.Dense(1, "sigmoid")(h), name=kind)
  if kind == "identity":
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dropout(rate)(inputs), name=kind)
  raise ValueError(kind)


def features(n=12, seed=0):
  return np.random.RandomState(seed).randn(n, 6).astype(np.float32)


def dict_features(n=12, seed=0):
  rng = np.random.RandomState(seed)
  return {"user_id": rng.randint(0, 20, n).astype(np.int64),
          "movie_id": rng.randint(0, 30, n).astype(np.int64)}


class MaskFunctionTest(tf.test.TestCase):

  def test_reference_matches_published_vectors(self):
    # Known MurmurHash3_x86_32 values anchor the reference implementation.
    self.assertEqual(_murmur3_x86_32(b"", 0), 0)
    self.assertEqual(_murmur3_x86_32(b"", 1), 0x514E28B7)
    self.assertEqual(_murmur3_x86_32(b"test", 0), 0xBA6BD213)
    self.assertEqual(_murmur3_x86_32(b"Hello, world!", 1234), 0xFAF6CDB3)

  def test_mask_hash_is_murmur3_of_the_five_words(self):
    cases = [(0, 0, 0, 0, 0), (7, 123456789012, 99, 2, 255),
             (2**32 - 1, -5, 3, 1, 7), (42, 2**62 + 17, 0, 0, 1)]
    for seed, key, t, layer, unit in cases:
      words = [key & _M32, (key >> 32) & _M32, t, layer, unit]
      data = b"".join(w.to_bytes(4, "little") for w in words)
      self.assertEqual(
          int(targets.mask_hash(seed, key, t, layer, unit)),
          _murmur3_x86_32(data, seed), msg=str((seed, key, t, layer, unit)))

  def test_tf_row_states_match_numpy(self):
    keys = np.array([0, 1, -1, 2**40 + 3], np.int64)
    t = np.array([0, 5, 9, 1], np.int32)
    self.assertAllEqual(targets.example_seeds(11, keys, t).numpy(),
                        targets.row_states(11, keys, t))

  def test_keep_fraction_matches_rate(self):
    keep = targets.keep_mask(3, np.arange(200)[:, None], 0, 0,
                             np.arange(500)[None, :], rate=0.3)
    self.assertAllClose(keep.mean(), 0.7, atol=0.01)
    self.assertTrue(targets.keep_mask(3, 1, 0, 0, np.arange(10), 0.0).all())
    self.assertFalse(targets.keep_mask(3, 1, 0, 0, np.arange(10), 1.0).any())

  def test_targets_equal_numpy_reference_masks(self):
    # End to end: what a Beam pipeline would recompute from the docs.
    model = build_model("identity", rate=0.5)
    x = np.random.RandomState(1).rand(5, 4).astype(np.float32) + 0.5
    keys = np.array([10, 11, 2**33, -4, 7], np.int64)
    num_samples, seed = 9, 123
    samples = []
    for t in range(num_samples):
      keep = targets.keep_mask(seed, keys[:, None], t, 0,
                               np.arange(4)[None, :], 0.5)
      samples.append(np.where(keep, x * 2.0, 0.0))
    expected = np.std(np.stack(samples), axis=0)
    got = targets.mc_dropout_targets(
        model, x, num_samples=num_samples, seed=seed, keys=keys,
        statistic="per_class_std")
    self.assertAllClose(got, expected, rtol=1e-6, atol=1e-7)


class MCDropoutModelTest(tf.test.TestCase):

  def test_replaces_every_dropout_and_shares_weights(self):
    for kind in ("nested", "sequential", "conv", "dict"):
      model = build_model(kind)
      clone = targets.mc_dropout_model(model)
      self.assertEmpty(keras_graph.dropout_layers(clone), msg=kind)
      seeded = [l for l in keras_graph.iter_layers(clone)
                if isinstance(l, targets.SeededDropout)]
      self.assertLen(seeded, len(keras_graph.dropout_layers(model)), msg=kind)
      self.assertEqual([l.layer_index for l in seeded],
                       list(range(len(seeded))))
      base_ids = {id(v) for v in model.weights}
      for v in clone.weights:
        if "seed_generator" not in v.path:
          self.assertIn(id(v), base_ids, msg=f"{kind}: {v.path} copied")

  def test_standalone_calls_are_stochastic_and_seeded(self):
    model = build_model("regression")
    x = features()
    clone = targets.mc_dropout_model(model)
    a, b = clone(x).numpy(), clone(x).numpy()
    self.assertNotAllClose(a, b)
    again = targets.mc_dropout_model(model)
    self.assertAllClose(again(x).numpy(), a)

  def test_noise_shape_and_spatial_dropout_share_masks(self):
    inputs = keras.Input((5, 3))
    out = keras.layers.Dropout(0.5, noise_shape=(None, 1, 3))(inputs)
    out = keras.layers.SpatialDropout1D(0.5)(out)
    clone = targets.mc_dropout_model(keras.Model(inputs, out))
    y = clone(np.ones((64, 5, 3), np.float32)).numpy()
    # Each (example, channel) mask is shared over the 5 time steps.
    self.assertAllEqual(y, np.repeat(y[:, :1, :], 5, axis=1))
    self.assertGreater((y == 0).mean(), 0.5)
    self.assertLess((y == 0).mean(), 0.95)

  def test_layer_config_round_trip(self):
    layer = targets.SeededDropout(0.25, noise_shape=(None, 1), seed=3,
                                  layer_index=2, name="d")
    config = layer.get_config()
    self.assertEqual({k: config[k] for k in
                      ("rate", "noise_shape", "seed", "layer_index")},
                     {"rate": 0.25, "noise_shape": (None, 1), "seed": 3,
                      "layer_index": 2})
    self.assertEqual(targets.SeededDropout.from_config(config).get_config(),
                     config)

  def test_keras_file_round_trip(self):
    clone = targets.mc_dropout_model(build_model("regression"))
    path = os.path.join(self.get_temp_dir(), "mc.keras")
    clone.save(path)
    loaded = keras.models.load_model(path)
    self.assertLen([l for l in loaded.layers
                    if isinstance(l, targets.SeededDropout)], 2)


class TargetsTest(tf.test.TestCase):

  def test_statistics_and_shapes(self):
    x = features()
    for kind, stat, shape in [("regression", "auto", (12,)),
                              ("binary", "auto", (12,)),
                              ("softmax", "auto", (12,)),
                              ("softmax", "std", (12, 3)),
                              ("softmax", "per_class_std", (12, 3)),
                              ("softmax", "predicted_class_std", (12,))]:
      out = targets.mc_dropout_targets(build_model(kind), x, num_samples=8,
                                       statistic=stat)
      self.assertEqual(out.shape, shape, msg=(kind, stat))
      self.assertEqual(out.dtype, np.float32)
      self.assertTrue(np.all(out >= 0) and np.all(np.isfinite(out)))
      self.assertGreater(out.max(), 0.0, msg=(kind, stat))

  def test_predicted_class_std_uses_deterministic_argmax(self):
    model = build_model("softmax")
    x = features(40)
    per_class = targets.mc_dropout_targets(model, x, num_samples=10,
                                           statistic="per_class_std")
    picked = targets.mc_dropout_targets(model, x, num_samples=10)
    cls = np.argmax(model.predict(x, verbose=0), axis=-1)
    self.assertAllClose(picked, per_class[np.arange(40), cls])
    self.assertGreater(len(set(cls)), 1)

  def test_population_std_of_the_samples(self):
    # One Dropout on the input: each sample is x * keep / (1 - rate).
    model = build_model("identity", rate=0.25)
    x = np.full((3, 4), 2.0, np.float32)
    out = targets.mc_dropout_targets(model, x, num_samples=400,
                                     statistic="std")
    # Bernoulli(0.75) scaled by 2 / 0.75: population std = 2 * sqrt(1/3).
    self.assertAllClose(out, np.full((3, 4), 2 * np.sqrt(1 / 3)), atol=0.15)

  def test_same_seed_is_independent_of_batching_and_tiling(self):
    model = build_model("softmax")
    x = features(37)
    ref = targets.mc_dropout_targets(model, x, num_samples=11, seed=5,
                                     statistic="per_class_std")
    for batch_size, spp in [(1, None), (8, 3), (37, 11), (64, 2)]:
      got = targets.mc_dropout_targets(model, x, num_samples=11, seed=5,
                                       batch_size=batch_size,
                                       samples_per_pass=spp,
                                       statistic="per_class_std")
      # Masks are identical; only matmul rounding depends on batch shape.
      self.assertAllClose(got, ref, rtol=1e-5, atol=1e-7,
                          msg=(batch_size, spp))
    with mock.patch.object(targets, "CHUNK_EXAMPLES", 5):
      got = targets.mc_dropout_targets(model, x, num_samples=11, seed=5,
                                       batch_size=4,
                                       statistic="per_class_std")
    self.assertAllClose(got, ref, rtol=1e-5, atol=1e-7)

  def test_split_calls_with_matching_keys(self):
    model = build_model("regression")
    x = features(30)
    keys = np.arange(30, dtype=np.int64) * 1000 + 7
    full = targets.mc_dropout_targets(model, x, num_samples=9, seed=2,
                                      keys=keys, batch_size=10)
    parts = [targets.mc_dropout_targets(model, x[a:b], num_samples=9, seed=2,
                                        keys=keys[a:b], batch_size=10)
             for a, b in [(0, 10), (10, 30)]]
    self.assertAllClose(np.concatenate(parts), full, rtol=1e-6, atol=0)
    # Without the matching keys, the second part uses other masks.
    wrong = targets.mc_dropout_targets(model, x[10:30], num_samples=9,
                                       seed=2, batch_size=10)
    self.assertNotAllClose(wrong, full[10:30])

  def test_other_seed_differs(self):
    model = build_model("regression")
    x = features(20)
    a = targets.mc_dropout_targets(model, x, num_samples=10, seed=0)
    b = targets.mc_dropout_targets(model, x, num_samples=10, seed=0)
    c = targets.mc_dropout_targets(model, x, num_samples=10, seed=1)
    self.assertAllEqual(a, b)
    self.assertGreater(np.abs(a - c).max(), 1e-3)

  def test_base_model_untouched_with_batch_norm(self):
    model = build_model("bn")
    x = features(50)
    # Non-trivial moving statistics, so that training mode would show.
    model.compile("sgd", "mse")
    model.fit(x, np.ones((50, 1)), epochs=2, verbose=0)
    before = [np.array(w.numpy()) for w in model.weights]
    predictions = model.predict(x, verbose=0)
    out = targets.mc_dropout_targets(model, x, num_samples=10)
    self.assertGreater(out.max(), 0.0)
    for w, b in zip(model.weights, before):
      self.assertAllEqual(w.numpy(), b, msg=w.path)
    self.assertAllEqual(model.predict(x, verbose=0), predictions)

  def test_batch_norm_in_inference_mode(self):
    # With rate 0 the MC model equals the deterministic inference pass.
    model = build_model("bn", rate=0.0)
    x = features(20)
    model.compile("sgd", "mse")
    model.fit(x, np.ones((20, 1)), epochs=1, verbose=0)
    clone = targets.mc_dropout_model(model)
    self.assertAllClose(clone(x), model.predict(x, verbose=0), atol=1e-6)
    self.assertAllEqual(targets.mc_dropout_targets(model, x, num_samples=4),
                        np.zeros(20, np.float32))

  def test_dict_inputs_with_embeddings(self):
    model = build_model("dict")
    x = dict_features(25)
    out = targets.mc_dropout_targets(model, x, num_samples=8)
    self.assertEqual(out.shape, (25,))
    self.assertGreater(out.min(), 0.0)
    # Same data, different batching of the dict: same targets.
    again = targets.mc_dropout_targets(model, x, num_samples=8, batch_size=4)
    self.assertAllClose(again, out, rtol=1e-5)

  def test_sequential_nested_sequential_and_conv(self):
    for kind, x in [("sequential", features(10)), ("nested", features(10)),
                    ("conv", np.random.RandomState(0).randn(
                        10, 6, 6, 2).astype(np.float32))]:
      out = targets.mc_dropout_targets(build_model(kind), x, num_samples=6)
      self.assertEqual(out.shape, (10,))
      self.assertGreater(out.max(), 0.0, msg=kind)

  def test_dataset_inputs_batched_and_unbatched(self):
    model = build_model("regression")
    x = features(21)
    ref = targets.mc_dropout_targets(model, x, num_samples=6, batch_size=8)
    unbatched = tf.data.Dataset.from_tensor_slices(x)
    for ds in (unbatched, unbatched.batch(5),
               unbatched.filter(lambda v: True).batch(3)):
      got = targets.mc_dropout_targets(model, ds, num_samples=6,
                                       batch_size=8)
      self.assertAllClose(got, ref, rtol=1e-6)
    dict_model = build_model("dict")
    dx = dict_features(9)
    self.assertAllClose(
        targets.mc_dropout_targets(
            dict_model, tf.data.Dataset.from_tensor_slices(dx).batch(4),
            num_samples=5),
        targets.mc_dropout_targets(dict_model, dx, num_samples=5),
        rtol=1e-6)

  def test_progress_bar(self):
    model = build_model("regression")
    with mock.patch("sys.stderr") as stderr:
      out = targets.mc_dropout_targets(model, features(), num_samples=4,
                                       progress=True)
    self.assertTrue(stderr.write.called)
    self.assertEqual(out.shape, (12,))

  def test_invalid_arguments(self):
    model = build_model("regression")
    x = features()
    cases = [
        (dict(num_samples=1), _ERR_NUM_SAMPLES),
        (dict(batch_size=0), _ERR_BATCH_SIZE),
        (dict(samples_per_pass=0), _ERR_SAMPLES_PER_PASS),
        (dict(statistic="var"), _ERR_STATISTIC),
        (dict(seed=-1), _ERR_SEED),
        (dict(keys=np.arange(11)), _ERR_KEYS),
    ]
    for kwargs, message in cases:
      with self.assertRaises(ValueError) as e:
        targets.mc_dropout_targets(model, x, **kwargs)
      self.assertEqual(str(e.exception), message)
    with self.assertRaises(ValueError) as e:
      targets.mc_dropout_targets(None, x)
    self.assertEqual(str(e.exception), _ERR_MODEL_NONE)
    with self.assertRaises(ValueError) as e:
      targets.mc_dropout_targets(model, None)
    self.assertEqual(str(e.exception), _ERR_X_NONE)
    inputs = keras.Input((6,))
    plain = keras.Model(inputs, keras.layers.Dense(1)(inputs),
                        name="no_dropout")
    with self.assertRaisesRegex(ValueError, _ERR_NO_DROPOUT):
      targets.mc_dropout_targets(plain, x)
    with self.assertRaisesRegex(ValueError, "argument `x`"):
      targets.mc_dropout_targets(model, [x, x])
    with self.assertRaisesRegex(ValueError, "argument `x`"):
      targets.mc_dropout_targets(
          model, tf.data.Dataset.from_tensor_slices((x, x[:, 0])))


class ResumeTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(targets, "CHUNK_EXAMPLES", 8))
    self.model = build_model("softmax")
    self.x = features(40)
    self.kwargs = dict(num_samples=6, seed=4, batch_size=4)

  def _chunks(self, path):
    return sorted(f for f in os.listdir(path) if f.startswith("chunk_"))

  def test_interrupted_run_resumes_only_missing_chunks(self):
    reference = targets.mc_dropout_targets(self.model, self.x, **self.kwargs)
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    real_write = targets._write_chunk
    written = []

    def write_then_crash(*args):
      if len(written) == 2:
        raise KeyboardInterrupt("simulated interruption")
      written.append(args[1])
      real_write(*args)

    with mock.patch.object(targets, "_write_chunk", write_then_crash):
      with self.assertRaises(KeyboardInterrupt):
        targets.mc_dropout_targets(self.model, self.x, output_path=path,
                                   **self.kwargs)
    self.assertLen(self._chunks(path), 2)
    with open(os.path.join(path, targets.MANIFEST_FILENAME)) as f:
      manifest = json.load(f)
    self.assertEqual(manifest["num_samples"], 6)
    self.assertEqual(manifest["seed"], 4)
    self.assertEqual(manifest["statistic"], "predicted_class_std")
    self.assertEqual(manifest["num_examples"], 40)

    with mock.patch.object(targets, "_compute_chunk",
                           wraps=targets._compute_chunk) as compute:
      resumed = targets.mc_dropout_targets(self.model, self.x,
                                           output_path=path, **self.kwargs)
    self.assertEqual(compute.call_count, 3)  # 5 chunks of 8, 2 were done.
    self.assertAllClose(resumed, reference, rtol=1e-6)
    self.assertLen(self._chunks(path), 5)
    # A finished directory is only read back.
    with mock.patch.object(targets, "_compute_chunk") as compute:
      again = targets.mc_dropout_targets(self.model, self.x,
                                         output_path=path, **self.kwargs)
    compute.assert_not_called()
    self.assertAllEqual(again, resumed)

  def test_corrupted_chunks_are_recomputed(self):
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    first = targets.mc_dropout_targets(self.model, self.x, output_path=path,
                                       **self.kwargs)
    chunk_a = os.path.join(path, "chunk_000001.npz")
    with open(chunk_a, "r+b") as f:
      f.truncate(os.path.getsize(chunk_a) // 2)
    chunk_b = os.path.join(path, "chunk_000003.npz")
    with np.load(chunk_b) as data:
      fields = dict(data)
    fields["values"] = fields["values"] + 1.0  # Valid zip, wrong values.
    with open(chunk_b, "wb") as f:
      np.savez(f, **fields)
    with mock.patch.object(targets, "_compute_chunk",
                           wraps=targets._compute_chunk) as compute:
      second = targets.mc_dropout_targets(self.model, self.x,
                                          output_path=path, **self.kwargs)
    self.assertEqual(compute.call_count, 2)
    self.assertAllEqual(second, first)

  def test_other_settings_raise(self):
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    targets.mc_dropout_targets(self.model, self.x, output_path=path,
                               **self.kwargs)
    changes = [("seed", dict(self.kwargs, seed=5), self.x, self.model),
               ("num_samples", dict(self.kwargs, num_samples=7), self.x,
                self.model),
               ("statistic", dict(self.kwargs, statistic="per_class_std"),
                self.x, self.model),
               ("num_examples", self.kwargs, self.x[:39], self.model),
               ("keys_hash", dict(self.kwargs, keys=np.arange(40) + 1),
                self.x, self.model),
               ("data_fingerprint", self.kwargs, self.x + 1.0, self.model),
               ("model_fingerprint", self.kwargs, self.x,
                build_model("softmax", seed=9))]
    for name, kwargs, x, model in changes:
      with self.assertRaises(ValueError) as e:
        targets.mc_dropout_targets(model, x, output_path=path, **kwargs)
      self.assertStartsWith(str(e.exception), _ERR_RESUME.format(name=name))
    # batch_size and tiling are not settings: the run resumes.
    with mock.patch.object(targets, "_compute_chunk") as compute:
      targets.mc_dropout_targets(self.model, self.x, output_path=path,
                                 **dict(self.kwargs, batch_size=3,
                                        samples_per_pass=2))
    compute.assert_not_called()

  def test_dataset_resume_checks_chunk_inputs(self):
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    ds = tf.data.Dataset.from_tensor_slices(self.x).filter(lambda v: True)
    first = targets.mc_dropout_targets(self.model, ds, output_path=path,
                                       **self.kwargs)
    self.assertAllClose(
        first, targets.mc_dropout_targets(self.model, self.x, **self.kwargs),
        rtol=1e-6)
    changed = tf.data.Dataset.from_tensor_slices(self.x[::-1]).filter(
        lambda v: True)
    with self.assertRaisesRegex(ValueError, "argument `x`.*differ"):
      targets.mc_dropout_targets(self.model, changed, output_path=path,
                                 **self.kwargs)


class ConvergenceTest(tf.test.TestCase):

  def test_halves_agree_more_with_more_samples(self):
    model = build_model("regression")
    x = features(60)
    few = targets.mc_convergence(model, x, num_samples=6)
    many = targets.mc_convergence(model, x, num_samples=200)
    self.assertEqual(set(many), {"pearson", "spearman", "reliability",
                                 "mean_relative_std_error", "num_samples",
                                 "num_examples"})
    self.assertEqual(many["num_samples"], 200)
    self.assertEqual(many["num_examples"], 60)
    self.assertGreater(many["pearson"], few["pearson"])
    self.assertGreater(many["reliability"], 0.9)
    self.assertAllClose(many["reliability"],
                        2 * many["pearson"] / (1 + many["pearson"]))
    self.assertLess(many["mean_relative_std_error"],
                    few["mean_relative_std_error"])
    self.assertBetween(many["spearman"], 0.5, 1.0)

  def test_noise_ceiling_returns_two_independent_runs(self):
    model = build_model("binary")
    x = features(30)
    a, b = targets.noise_ceiling(model, x, num_samples=20, seeds=(3, 8))
    self.assertAllEqual(
        a, targets.mc_dropout_targets(model, x, num_samples=20, seed=3))
    self.assertAllEqual(
        b, targets.mc_dropout_targets(model, x, num_samples=20, seed=8))
    self.assertNotAllClose(a, b)
    with self.assertRaises(ValueError) as e:
      targets.noise_ceiling(model, x, seeds=(3, 3))
    self.assertEqual(str(e.exception), _ERR_SEEDS)


if __name__ == "__main__":
  tf.test.main()
