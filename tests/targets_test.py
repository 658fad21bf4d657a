"""Tests for dropvar_tf.targets (mc_dropout_targets, split_half_targets)."""

import contextlib
import io
import json
import os
import sys
import tempfile
from unittest import mock

import numpy as np

from dropvar_tf import mask_hash
from dropvar_tf import sources
from dropvar_tf import target_store
from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

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
_ERR_NO_DROPOUT = "model 'no_dropout' without dropout sources"
_ERR_X_NONE = ("Invalid value received for argument `x`. Expected a numpy "
               "array, a list or dict of arrays, a tf.RaggedTensor or a "
               "tf.data.Dataset. Received: x=None")
_ERR_X_SPEC = ("Invalid value received for argument `x`. Expected input "
               "matching the model's input spec (features: float32, shape "
               "(None, 6)). Received: x='{}'")
_ERR_X_NON_FINITE = ("Invalid value received for argument `x`. Expected "
                     "finite values (no NaN or Inf). Received: x='2 of 12 "
                     "rows with NaN or Inf values'")
_ERR_X_EMPTY = ("Invalid value received for argument `x`. Expected at least "
                "one example. Received: x='float32 array of shape (0, 6)'")
_ERR_RESUME = ("Invalid value received for argument `output_path`. Expected "
               "a resume directory written with the same settings; its "
               "`{name}` is")


class TargetsTest(tf.test.TestCase):

  def test_targets_equal_numpy_reference_masks(self):
    # End to end: what a Beam pipeline would recompute from the docs.
    model = tm.target_model("identity", rate=0.5)
    x = np.random.RandomState(1).rand(5, 4).astype(np.float32) + 0.5
    keys = np.array([10, 11, 2**33, -4, 7], np.int64)
    num_samples, seed = 9, 123
    samples = []
    for t in range(num_samples):
      keep = mask_hash.keep_mask(seed, keys[:, None], t, 0,
                                 np.arange(4)[None, :], 0.5)
      samples.append(np.where(keep, x * 2.0, 0.0))
    expected = np.std(np.stack(samples), axis=0)
    got = targets.mc_dropout_targets(
        model, x, num_samples=num_samples, seed=seed, keys=keys,
        statistic="per_class_std")
    self.assertAllClose(got, expected, rtol=1e-6, atol=1e-7)


  def test_statistics_and_shapes(self):
    x = tm.target_features()
    for kind, stat, shape in [("regression", "auto", (12,)),
                              ("binary", "auto", (12,)),
                              ("softmax", "auto", (12,)),
                              ("softmax", "std", (12, 3)),
                              ("softmax", "per_class_std", (12, 3)),
                              ("softmax", "predicted_class_std", (12,))]:
      out = targets.mc_dropout_targets(tm.target_model(kind), x, num_samples=8,
                                       statistic=stat)
      self.assertEqual(out.shape, shape, msg=(kind, stat))
      self.assertEqual(out.dtype, np.float32)
      self.assertTrue(np.all(out >= 0) and np.all(np.isfinite(out)))
      self.assertGreater(out.max(), 0.0, msg=(kind, stat))

  def test_predicted_class_std_uses_deterministic_argmax(self):
    model = tm.target_model("softmax")
    x = tm.target_features(40)
    per_class = targets.mc_dropout_targets(model, x, num_samples=10,
                                           statistic="per_class_std")
    picked = targets.mc_dropout_targets(model, x, num_samples=10)
    cls = np.argmax(model.predict(x, verbose=0), axis=-1)
    self.assertAllClose(picked, per_class[np.arange(40), cls])
    self.assertGreater(len(set(cls)), 1)

  def test_population_std_of_the_samples(self):
    # One Dropout on the input: each sample is x * keep / (1 - rate).
    model = tm.target_model("identity", rate=0.25)
    x = np.full((3, 4), 2.0, np.float32)
    out = targets.mc_dropout_targets(model, x, num_samples=400,
                                     statistic="std")
    # Bernoulli(0.75) scaled by 2 / 0.75: population std = 2 * sqrt(1/3).
    self.assertAllClose(out, np.full((3, 4), 2 * np.sqrt(1 / 3)), atol=0.15)

  def test_same_seed_is_independent_of_batching_and_tiling(self):
    model = tm.target_model("softmax")
    x = tm.target_features(37)
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
    model = tm.target_model("regression")
    x = tm.target_features(30)
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
    model = tm.target_model("regression")
    x = tm.target_features(20)
    a = targets.mc_dropout_targets(model, x, num_samples=10, seed=0)
    b = targets.mc_dropout_targets(model, x, num_samples=10, seed=0)
    c = targets.mc_dropout_targets(model, x, num_samples=10, seed=1)
    self.assertAllEqual(a, b)
    self.assertGreater(np.abs(a - c).max(), 1e-3)

  def test_base_model_untouched_with_batch_norm(self):
    model = tm.target_model("bn")
    x = tm.target_features(50)
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
    # With rate 0 every sample is the deterministic inference pass.
    model = tm.target_model("bn", rate=0.0)
    x = tm.target_features(20)
    model.compile("sgd", "mse")
    model.fit(x, np.ones((20, 1)), epochs=1, verbose=0)
    with self.assertWarnsRegex(RuntimeWarning, "has rate 0"):
      out = targets.mc_dropout_targets(model, x, num_samples=4)
    self.assertAllEqual(out, np.zeros(20, np.float32))

  def test_dict_inputs_with_embeddings(self):
    model = tm.target_model("dict")
    x = tm.target_dict_features(25)
    out = targets.mc_dropout_targets(model, x, num_samples=8)
    self.assertEqual(out.shape, (25,))
    self.assertGreater(out.min(), 0.0)
    # Same data, different batching of the dict: same targets.
    again = targets.mc_dropout_targets(model, x, num_samples=8, batch_size=4)
    self.assertAllClose(again, out, rtol=1e-5)

  def test_sequential_nested_sequential_and_conv(self):
    for kind, x in [("sequential", tm.target_features(10)),
                    ("nested", tm.target_features(10)),
                    ("conv", np.random.RandomState(0).randn(
                        10, 6, 6, 2).astype(np.float32))]:
      out = targets.mc_dropout_targets(tm.target_model(kind), x, num_samples=6)
      self.assertEqual(out.shape, (10,))
      self.assertGreater(out.max(), 0.0, msg=kind)

  def test_dataset_inputs_batched_and_unbatched(self):
    model = tm.target_model("regression")
    x = tm.target_features(21)
    ref = targets.mc_dropout_targets(model, x, num_samples=6, batch_size=8)
    unbatched = tf.data.Dataset.from_tensor_slices(x)
    for ds in (unbatched, unbatched.batch(5),
               unbatched.filter(lambda v: True).batch(3)):
      got = targets.mc_dropout_targets(model, ds, num_samples=6,
                                       batch_size=8)
      self.assertAllClose(got, ref, rtol=1e-6)
    dict_model = tm.target_model("dict")
    dx = tm.target_dict_features(9)
    self.assertAllClose(
        targets.mc_dropout_targets(
            dict_model, tf.data.Dataset.from_tensor_slices(dx).batch(4),
            num_samples=5),
        targets.mc_dropout_targets(dict_model, dx, num_samples=5),
        rtol=1e-6)

  def _progress_text(self, **kwargs):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      out = targets.mc_dropout_targets(tm.target_model("regression"),
                                       tm.target_features(), num_samples=4,
                                       **kwargs)
    self.assertEqual(out.shape, (12,))
    return stderr.getvalue()

  def test_progress_bar(self):
    # The bar counts examples: the last update shows all 12 of 12.
    text = self._progress_text(progress=True)
    self.assertIn("MC dropout: 100%", text)
    self.assertIn("12/12", text)
    self.assertEmpty(self._progress_text(progress=False))

  def test_progress_bar_only_for_long_runs_by_default(self):
    # 12 examples x 4 samples = 48 rows.
    with mock.patch.object(targets, "PROGRESS_MIN_ROWS", 49):
      self.assertEmpty(self._progress_text())
    with mock.patch.object(targets, "PROGRESS_MIN_ROWS", 48):
      self.assertIn("12/12", self._progress_text())

  def test_invalid_arguments(self):
    model = tm.target_model("regression")
    x = tm.target_features()
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
          model, tf.data.Dataset.from_tensor_slices((x[:, :5], x[:, 0])))
    # Labels of an (x, y) Dataset are ignored: MC targets need none.
    self.assertAllEqual(
        targets.mc_dropout_targets(
            model, tf.data.Dataset.from_tensor_slices((x, x[:, 0])),
            num_samples=4),
        targets.mc_dropout_targets(model, x, num_samples=4))


  def test_bad_inputs_are_refused_before_any_pass(self):
    model = tm.target_model("regression")
    x = tm.target_features()
    bad = x.copy()
    bad[2, 0] = np.nan
    bad[5, 3] = np.inf
    cases = [
        (x[:, :5], _ERR_X_SPEC.format("float32 array of shape (12, 5)")),
        (x[:, 0], _ERR_X_SPEC.format("float32 array of shape (12,)")),
        (np.full((12, 6), "a"), _ERR_X_SPEC.format("<U1 array of shape "
                                                   "(12, 6)")),
        (x[:0], _ERR_X_EMPTY),
        (bad, _ERR_X_NON_FINITE),
        (tf.data.Dataset.from_tensor_slices(bad).batch(5), _ERR_X_NON_FINITE),
    ]
    for bad_x, message in cases:
      for fn in (targets.mc_dropout_targets, targets.split_half_targets):
        with self.assertRaises(ValueError) as e:
          fn(model, bad_x, num_samples=4)
        self.assertEqual(str(e.exception), message)


class ResumeTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(targets, "CHUNK_EXAMPLES", 8))
    self.model = tm.target_model("softmax")
    self.x = tm.target_features(40)
    self.kwargs = dict(num_samples=6, seed=4, batch_size=4)

  def _chunks(self, path):
    return sorted(f for f in os.listdir(path) if f.startswith("chunk_"))

  def test_interrupted_run_resumes_only_missing_chunks(self):
    reference = targets.mc_dropout_targets(self.model, self.x, **self.kwargs)
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    real_write = target_store.write_chunk
    written = []

    def write_then_crash(*args):
      if len(written) == 2:
        raise KeyboardInterrupt("simulated interruption")
      written.append(args[1])
      real_write(*args)

    with mock.patch.object(target_store, "write_chunk", write_then_crash):
      with self.assertRaises(KeyboardInterrupt):
        targets.mc_dropout_targets(self.model, self.x, output_path=path,
                                   **self.kwargs)
    self.assertLen(self._chunks(path), 2)
    with open(os.path.join(path, target_store.MANIFEST_FILENAME)) as f:
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
                tm.target_model("softmax", seed=9))]
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

  def test_same_weights_in_another_architecture_are_refused(self):
    path = tempfile.mkdtemp(dir=self.get_temp_dir())
    first = targets.mc_dropout_targets(self.model, self.x, output_path=path,
                                       **self.kwargs)
    # Rebuilt the same way (new layer names), the same weights: resumes.
    rebuilt = tm.target_model("softmax")
    rebuilt.set_weights(self.model.get_weights())
    with mock.patch.object(targets, "_compute_chunk") as compute:
      again = targets.mc_dropout_targets(rebuilt, self.x, output_path=path,
                                         **self.kwargs)
    compute.assert_not_called()
    self.assertAllEqual(again, first)
    # The same weights with another dropout rate, or another activation,
    # give other targets: refused, not read back.
    other_rate = tm.target_model("softmax", rate=0.5)
    other_rate.set_weights(self.model.get_weights())
    other_activation = keras.models.clone_model(
        self.model, clone_function=lambda layer: layer.__class__.from_config(
            dict(layer.get_config(), activation="tanh")
            if layer.get_config().get("activation") == "relu"
            else layer.get_config()))
    other_activation.set_weights(self.model.get_weights())
    for model in (other_rate, other_activation):
      with self.assertRaises(ValueError) as e:
        targets.mc_dropout_targets(model, self.x, output_path=path,
                                   **self.kwargs)
      self.assertStartsWith(str(e.exception),
                            _ERR_RESUME.format(name="model_fingerprint"))

  def test_fingerprint_leaves_out_names_and_addresses(self):
    def bidirectional():
      inputs = keras.Input((5, 3))
      h = keras.layers.Bidirectional(keras.layers.LSTM(4, dropout=0.2))(
          inputs)
      return keras.Model(inputs, keras.layers.Dense(1)(h))
    first, second = bidirectional(), bidirectional()  # lstm, lstm_1 ...
    second.set_weights(first.get_weights())
    self.assertEqual(targets.model_fingerprint(first),
                     targets.model_fingerprint(second))

    class Scaled(keras.layers.Layer):
      def __init__(self, fn=np.tanh, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

      def get_config(self):
        return dict(super().get_config(), fn=self.fn, kinds={"a", "b"})

    config = targets._layer_config(Scaled())
    self.assertNotIn("0x", config)
    self.assertIn("<numpy.ufunc>", config)

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


class SplitHalfTest(tf.test.TestCase):

  def test_full_estimate_is_mc_dropout_targets(self):
    model = tm.target_model("softmax")
    x = tm.target_features(30)
    kwargs = dict(num_samples=9, seed=3, batch_size=8, keys=np.arange(30) + 5)
    half_a, half_b, full = targets.split_half_targets(model, x, **kwargs)
    self.assertAllEqual(full, targets.mc_dropout_targets(model, x, **kwargs))
    for half in (half_a, half_b):
      self.assertEqual(half.shape, (30,))
      self.assertEqual(half.dtype, np.float32)
    self.assertNotAllClose(half_a, half_b)

  def test_halves_are_the_first_and_last_samples(self):
    # The identity model's samples are known: x * keep / (1 - rate).
    model = tm.target_model("identity", rate=0.5)
    x = np.random.RandomState(2).rand(5, 4).astype(np.float32) + 0.5
    keys = np.arange(5)
    samples = np.stack([
        np.where(mask_hash.keep_mask(1, keys[:, None], t, 0,
                                     np.arange(4)[None, :], 0.5), 2 * x, 0.0)
        for t in range(7)])
    half_a, half_b, _ = targets.split_half_targets(
        model, x, num_samples=7, seed=1, statistic="per_class_std")
    self.assertAllClose(half_a, np.std(samples[:3], axis=0), rtol=1e-6,
                        atol=1e-7)
    self.assertAllClose(half_b, np.std(samples[3:], axis=0), rtol=1e-6,
                        atol=1e-7)


class EverySourceTest(tf.test.TestCase):
  """Every kind of dropout source: seeded, batching-independent targets."""

  def setUp(self):
    super().setUp()
    sources.register_dropout_source(tm.NoisyMask, tm.noisy_mask_noise)

  def tearDown(self):
    sources.unregister_dropout_source(tm.NoisyMask)
    super().tearDown()

  def test_seeded_and_independent_of_batching(self):
    for kind in tm.SOURCE_KINDS:
      with self.subTest(kind=kind):
        model = tm.source_model(kind)
        x = tm.source_inputs(kind, 10)

        def run(seed, batch_size, m=model, x=x):
          return targets.mc_dropout_targets(m, x, num_samples=6, seed=seed,
                                            batch_size=batch_size,
                                            progress=False)

        first = run(0, 10)
        self.assertTrue(np.all(first > 0))
        self.assertAllEqual(run(0, 10), first)
        self.assertNotAllClose(run(1, 10), first)
        self.assertAllClose(run(0, 3), first, rtol=1e-5, atol=1e-7)

  def test_part_of_the_data_with_its_keys(self):
    # Resuming or sharding: a slice with its keys gets the same targets.
    for kind in ("transformer", "bidirectional", "gaussian"):
      model = tm.source_model(kind)
      x = tm.source_inputs(kind, 8)
      full = targets.mc_dropout_targets(model, x, num_samples=5,
                                        progress=False)
      part = targets.mc_dropout_targets(model, x[5:], num_samples=5,
                                        keys=np.arange(5, 8), progress=False)
      self.assertAllClose(part, full[5:], rtol=1e-5, msg=kind)

  def test_all_zero_targets_warn_with_the_cause(self):
    x = tm.target_features()
    with self.assertWarnsRegex(RuntimeWarning,
                               "every dropout source has rate 0"):
      targets.mc_dropout_targets(tm.target_model("regression", rate=0.0), x,
                                 num_samples=4, progress=False)
    # A Dropout on a branch that the output ignores (multiplied by 0).
    inputs = keras.Input((tm.NUM_FEATURES,))
    dead = keras.layers.Dropout(0.5, name="dead")(inputs)
    h = keras.layers.Add()([inputs, keras.layers.Lambda(
        lambda v: v * 0.0)(dead)])
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    with self.assertWarnsRegex(
        RuntimeWarning, r"Every MC dropout target is exactly 0: the sampled "
        r"dropout sources \('dead' \(dropout, rate 0.5\)\) never change"):
      out = targets.mc_dropout_targets(model, x, num_samples=4,
                                       progress=False)
    self.assertAllEqual(out, np.zeros(len(x), np.float32))


if __name__ == "__main__":
  tf.test.main()
