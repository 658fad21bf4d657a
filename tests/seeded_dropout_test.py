"""Tests for dropvar_tf.seeded_dropout."""

import os
import sys
import threading

import numpy as np
from scipy import stats

from dropvar_tf import keras_graph
from dropvar_tf import mask_hash
from dropvar_tf import seeded_dropout
from dropvar_tf import sources
from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_ERR_RATE = ("Invalid value received for argument `rate`. Expected a float "
             "in [0, 1]. Received: rate=1.5")


def _identity_clone(rate=0.5):
  return seeded_dropout.mc_dropout_model(tm.target_model("identity", rate))


def _reference(x, seed, keys, t, rate=0.5):
  """What the identity model's one Dropout gives with the documented masks."""
  keep = mask_hash.keep_mask(seed, keys[:, None], t, 0,
                             np.arange(x.shape[1])[None, :], rate)
  return np.where(keep, x / (1.0 - rate), 0.0)


class MCDropoutModelTest(tf.test.TestCase):

  def test_samples_every_dropout_and_shares_weights(self):
    for kind in ("nested", "sequential", "conv", "dict"):
      model = tm.target_model(kind)
      clone = seeded_dropout.mc_dropout_model(model)
      self.assertIs(clone.base_model, model, msg=kind)
      self.assertEqual([n.layer_index for n in clone.noise_layers],
                       list(range(len(keras_graph.dropout_layers(model)))))
      base_ids = {id(v) for v in model.weights}
      for v in clone.weights:
        if "seed_generator" not in v.path:
          self.assertIn(id(v), base_ids, msg=f"{kind}: {v.path} copied")

  def test_base_model_unchanged_after_sampling(self):
    model = tm.target_model("regression")
    x = tm.target_features()
    before = model(x, training=False).numpy()
    clone = seeded_dropout.mc_dropout_model(model)
    with self.assertRaises(KeyError):
      with seeded_dropout.sampling(clone.sources, clone.noise_layers):
        raise KeyError("inside")
    clone(x)
    for layer in model.layers:
      self.assertNotIn("call", vars(layer), msg=layer.name)
    self.assertAllEqual(model(x, training=False).numpy(), before)

  def test_sampling_blocks_of_two_threads_do_not_interleave(self):
    model = tm.target_model("regression")
    clone = seeded_dropout.mc_dropout_model(model)
    events, inside = [], threading.Event()

    def hold(name, release=None):
      with seeded_dropout.sampling(clone.sources, clone.noise_layers):
        events.append(f"{name} in")
        inside.set()
        if release is not None:
          release.wait(10)
        events.append(f"{name} out")

    release = threading.Event()
    first = threading.Thread(target=hold, args=("a", release))
    first.start()
    inside.wait(10)
    second = threading.Thread(target=hold, args=("b",))
    second.start()
    second.join(0.5)  # Blocked until the first block exits.
    release.set()
    first.join(10)
    second.join(10)
    self.assertEqual(events, ["a in", "a out", "b in", "b out"])
    for layer in model.layers:
      self.assertNotIn("call", vars(layer), msg=layer.name)

  def test_row_context_is_per_thread(self):
    seen = []
    with seeded_dropout.row_context(tf.zeros([2], tf.uint32)):
      thread = threading.Thread(
          target=lambda: seen.append(seeded_dropout._CONTEXT.states))
      thread.start()
      thread.join(10)
    self.assertEqual(seen, [None])

  def test_standalone_calls_are_stochastic_and_seeded(self):
    model = tm.target_model("regression")
    x = tm.target_features()
    clone = seeded_dropout.mc_dropout_model(model)
    a, b = clone(x).numpy(), clone(x).numpy()
    self.assertNotAllClose(a, b)
    again = seeded_dropout.mc_dropout_model(model)
    self.assertAllClose(again(x).numpy(), a)

  def test_noise_shape_and_spatial_dropout_share_masks(self):
    inputs = keras.Input((5, 3))
    out = keras.layers.Dropout(0.5, noise_shape=(None, 1, 3))(inputs)
    out = keras.layers.SpatialDropout1D(0.5)(out)
    clone = seeded_dropout.mc_dropout_model(keras.Model(inputs, out))
    y = clone(np.ones((64, 5, 3), np.float32)).numpy()
    # Each (example, channel) mask is shared over the 5 time steps.
    self.assertAllEqual(y, np.repeat(y[:, :1, :], 5, axis=1))
    self.assertGreater((y == 0).mean(), 0.5)
    self.assertLess((y == 0).mean(), 0.95)

  def test_batch_norm_in_inference_mode(self):
    # With rate 0 the MC model equals the deterministic inference pass.
    model = tm.target_model("bn", rate=0.0)
    x = tm.target_features(20)
    model.compile("sgd", "mse")
    model.fit(x, np.ones((20, 1)), epochs=1, verbose=0)
    clone = seeded_dropout.mc_dropout_model(model)
    self.assertAllClose(clone(x), model.predict(x, verbose=0), atol=1e-6)

  def test_layer_config_round_trip(self):
    layer = seeded_dropout.SeededDropout(0.25, noise_shape=(None, 1), seed=3,
                                         layer_index=2, name="d")
    config = layer.get_config()
    self.assertEqual({k: config[k] for k in
                      ("rate", "noise_shape", "seed", "layer_index")},
                     {"rate": 0.25, "noise_shape": (None, 1), "seed": 3,
                      "layer_index": 2})
    self.assertEqual(
        seeded_dropout.SeededDropout.from_config(config).get_config(), config)

  def test_invalid_rate(self):
    with self.assertRaises(ValueError) as e:
      seeded_dropout.SeededDropout(1.5)
    self.assertEqual(str(e.exception), _ERR_RATE)

  def test_keras_file_round_trip(self):
    clone = seeded_dropout.mc_dropout_model(tm.target_model("regression"))
    path = os.path.join(self.get_temp_dir(), "mc.keras")
    clone.save(path)
    loaded = keras.models.load_model(path)
    self.assertIsInstance(loaded, seeded_dropout.MCDropoutModel)
    self.assertLen(loaded.noise_layers, 2)
    x = tm.target_features()
    with seeded_dropout.row_context(mask_hash.example_seeds(
        0, tf.range(len(x), dtype=tf.int64), tf.zeros([len(x)], tf.int32))):
      self.assertAllClose(loaded(x), clone(x))


class RowContextTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.clone = _identity_clone()
    self.x = np.random.RandomState(1).rand(6, 4).astype(np.float32) + 0.5
    self.keys = np.array([3, 9, -2, 2**35, 0, 11], np.int64)

  def _states(self, seed, t):
    return mask_hash.example_seeds(
        seed, tf.constant(self.keys), tf.fill([len(self.keys)], t))

  def test_masks_are_the_documented_function_of_the_row_states(self):
    for seed, t in [(0, 0), (7, 3)]:
      with seeded_dropout.row_context(self._states(seed, t)):
        got = self.clone(self.x).numpy()
      self.assertAllClose(got, _reference(self.x, seed, self.keys, t),
                          rtol=1e-6, msg=(seed, t))

  def test_each_call_of_a_shared_dropout_draws_its_own_documented_mask(self):
    inputs = keras.Input((4,))
    drop = keras.layers.Dropout(0.5)
    model = keras.Model(inputs, keras.layers.Concatenate()(
        [drop(inputs), drop(inputs), drop(inputs)]))
    clone = seeded_dropout.mc_dropout_model(model)
    seed, t = 7, 3
    with seeded_dropout.row_context(self._states(seed, t)):
      got = clone(self.x).numpy()
    units = np.arange(4)[None, :]
    for call in range(3):
      keep = mask_hash.keep_mask(seed, self.keys[:, None], t,
                                 call * seeded_dropout.CALL_STRIDE, units, 0.5)
      # Call 0 keeps the masks of a source called once.
      self.assertAllClose(got[:, 4 * call:4 * call + 4],
                          np.where(keep, self.x / 0.5, 0.0), rtol=1e-6,
                          msg=call)
    self.assertNotAllClose(got[:, :4], got[:, 4:8])
    # Counting starts again with every pass.
    with seeded_dropout.row_context(self._states(seed, t)):
      self.assertAllEqual(clone(self.x).numpy(), got)

  def test_call_numbers_stay_within_the_hash_index(self):
    with self.assertRaisesRegex(ValueError, "an integer below 1048576"):
      seeded_dropout.SeededDropout(0.5, layer_index=2**20)
    noise = seeded_dropout.SeededDropout(0.5, layer_index=5, name="drop")
    with seeded_dropout._numbered(noise, 4095):
      self.assertEqual(noise.call_number, 4095)
    self.assertEqual(noise.call_number, 0)
    with self.assertRaisesWithLiteralMatch(
        ValueError, "Invalid value received for argument `model`. Expected "
        "dropout sources called at most 4096 times in one forward pass (each "
        "call draws its own masks). Received: model=\"source 5 ('drop') "
        "called more often\""):
      with seeded_dropout._numbered(noise, 4096):
        pass

  def test_same_states_same_masks(self):
    states = self._states(5, 2)
    with seeded_dropout.row_context(states):
      a = self.clone(self.x).numpy()
      b = self.clone(self.x).numpy()
    self.assertAllEqual(a, b)

  def test_nested_and_raising_blocks_restore_the_outer_states(self):
    outer = _reference(self.x, 1, self.keys, 0)
    with seeded_dropout.row_context(self._states(1, 0)):
      with self.assertRaises(KeyError):
        with seeded_dropout.row_context(self._states(2, 0)):
          raise KeyError("inside")
      self.assertAllClose(self.clone(self.x).numpy(), outer, rtol=1e-6)
    # Outside every block the layer draws stand-alone masks again.
    a, b = self.clone(self.x).numpy(), self.clone(self.x).numpy()
    self.assertNotAllClose(a, b)


# Keras' own MC dropout as the reference: T passes with training=True and
# every BatchNormalization frozen (trainable=False keeps it in inference).
_T = 500
_EXAMPLES = 48


def _keras_mc_std(model, x, seed):
  """Per-example std of T Keras training-mode passes, in one tiled call."""
  for layer in keras_graph.iter_layers(model):
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.trainable = False
  keras.utils.set_random_seed(seed)
  tiled = np.tile(x, (_T,) + (1,) * (x.ndim - 1))
  y = tf.function(lambda v: model(v, training=True))(tiled).numpy()
  return y.reshape(_T, len(x)).std(axis=0)


def keras_reference(kind):
  """Compares MC targets of `tm.source_model(kind)` with Keras' own MC.

  Returns:
    (ratios, spearmans, bound): the ratio of mean DPV and the Spearman
    correlation against each of two independent Keras runs, and the
    Spearman between those two runs (the noise bound).
  """
  model = tm.source_model(kind)
  x = tm.source_inputs(kind, _EXAMPLES)
  ours = targets.mc_dropout_targets(model, x, num_samples=_T, seed=3,
                                    progress=False)
  runs = [_keras_mc_std(model, x, seed=s) for s in (1, 2)]
  return ([ours.mean() / r.mean() for r in runs],
          [stats.spearmanr(ours, r)[0] for r in runs],
          stats.spearmanr(runs[0], runs[1])[0])


def print_reference_table():
  """Prints `keras_reference` of every kind as the rows of a Markdown table.

  The table of docs/dropout_sources.md.
  """
  sources.register_dropout_source(tm.NoisyMask, tm.noisy_mask_noise)
  try:
    for kind in tm.SOURCE_KINDS:
      ratios, spearmans, bound = keras_reference(kind)
      print(f"| {kind} | {ratios[0]:.3f} / {ratios[1]:.3f} | "
            f"{spearmans[0]:.3f} / {spearmans[1]:.3f} | {bound:.3f} |")
  finally:
    sources.unregister_dropout_source(tm.NoisyMask)


class KerasReferenceTest(tf.test.TestCase):
  """Every source kind samples what Keras' own MC dropout samples."""

  def setUp(self):
    super().setUp()
    sources.register_dropout_source(tm.NoisyMask, tm.noisy_mask_noise,
                                    kind="noisy_mask")

  def tearDown(self):
    sources.unregister_dropout_source(tm.NoisyMask)
    super().tearDown()

  def test_mean_and_ranking_match_keras_mc(self):
    for kind in tm.SOURCE_KINDS:
      with self.subTest(kind=kind):
        ratios, spearmans, bound = keras_reference(kind)
        self.assertAllClose(ratios, [1.0, 1.0], atol=0.05)
        self.assertGreater(np.mean(spearmans), bound - 0.03)


class EverySourceTest(tf.test.TestCase):

  def test_dynamic_sequence_length(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, 3))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.MultiHeadAttention(2, 2, dropout=0.5)(h, h)
    outputs = keras.layers.GaussianDropout(0.3)(h)
    clone = seeded_dropout.mc_dropout_model(keras.Model(inputs, outputs))
    x = np.ones((3, 7, 3), np.float32)
    out = []
    for rows in (3, 2):
      with seeded_dropout.row_context(mask_hash.example_seeds(
          0, tf.range(rows, dtype=tf.int64), tf.zeros([rows], tf.int32))):
        out.append(clone(x[:rows]).numpy())
    self.assertEqual(out[0].shape, (3, 7, 4))
    # The same keys get the same noise, whatever the batch.
    self.assertAllClose(out[0][:2], out[1], rtol=1e-5)
    self.assertNotAllClose(out[0][0], out[0][1])

  def test_xla_compiled_pass_equals_the_plain_one(self):
    for kind in ("transformer", "lstm", "gaussian"):
      clone = seeded_dropout.mc_dropout_model(tm.source_model(kind))
      x = tm.source_inputs(kind, 4)
      states = mask_hash.example_seeds(5, tf.range(4, dtype=tf.int64),
                                       tf.fill([4], 2))

      def run(v, clone=clone, states=states):
        with seeded_dropout.row_context(states):
          return clone(v)

      plain = tf.function(run)(x).numpy()
      compiled = tf.function(run, jit_compile=True)(x).numpy()
      self.assertAllClose(compiled, plain, rtol=1e-4, atol=1e-5, msg=kind)

  def test_standalone_calls_are_stochastic_and_seeded_for_every_kind(self):
    for kind in ("transformer", "gaussian", "alpha", "conv_lstm"):
      model = tm.source_model(kind)
      x = tm.source_inputs(kind, 4)
      clone = seeded_dropout.mc_dropout_model(model)
      first, second = clone(x).numpy(), clone(x).numpy()
      self.assertNotAllClose(first, second, msg=kind)
      again = seeded_dropout.mc_dropout_model(model)(x).numpy()
      self.assertAllClose(again, first, msg=kind)

  def test_bare_subclassed_model(self):
    model = tm.subclassed_regressor()
    x = tm.source_inputs("dropout", 8)
    clone = seeded_dropout.mc_dropout_model(model)
    self.assertEqual([n.layer_index for n in clone.noise_layers], [0, 1])
    a, b = clone(x).numpy(), clone(x).numpy()
    self.assertNotAllClose(a, b)
    self.assertAllClose(model(x), model(x))

  def test_rnn_masks_are_per_sequence_and_restored(self):
    model = tm.source_model("lstm")
    cell = model.get_layer("lstm").cell
    clone = seeded_dropout.mc_dropout_model(model)
    x = tm.source_inputs("lstm", 6)
    a, b = clone(x).numpy(), clone(x).numpy()
    self.assertNotAllClose(a, b)
    for name in ("get_dropout_mask", "get_recurrent_dropout_mask",
                 "reset_dropout_mask"):
      self.assertNotIn(name, vars(cell))
    self.assertNotIn("call", vars(model.get_layer("lstm")))
    self.assertAllClose(model(x), model(x))


if __name__ == "__main__":
  tf.test.main()
