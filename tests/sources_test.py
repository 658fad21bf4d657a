"""Tests for dropvar_tf.sources (dropout_sources, refusals, registry)."""

import os
import sys

import dropvar_tf as dv
from dropvar_tf import keras_graph
from dropvar_tf import sources
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_REFUSAL = (
    "Invalid value received for argument `model`. Expected a model whose "
    "random layers are all dropout sources that can be reproduced: "
    f"{sources.SUPPORTED}. Register a dropout-like class with "
    "`dropvar_tf.register_dropout_source(layer_class, noise_fn)` (see "
    "docs/dropout_sources.md); other random layers cannot be sampled "
    "reproducibly. Received: model=\"layer {path!r} of class {cls}, which "
    "draws random numbers in training\"")

_EXPECTED = {
    "dropout": [("drop", "dropout", 0.3)],
    "spatial_dropout": [("sdrop", "spatial_dropout", 0.3)],
    "transformer": [("encoder/block_1/attention", "attention_dropout", 0.3),
                    ("encoder/block_1/drop", "dropout", 0.3),
                    ("top_drop", "dropout", 0.1)],
    "lstm": [("lstm", "rnn_dropout", 0.3),
             ("lstm", "rnn_recurrent_dropout", 0.3)],
    "bidirectional": [("bidir/forward_lstm", "rnn_dropout", 0.3),
                      ("bidir/forward_lstm", "rnn_recurrent_dropout", 0.3),
                      ("bidir/backward_lstm", "rnn_dropout", 0.3),
                      ("bidir/backward_lstm", "rnn_recurrent_dropout", 0.3)],
    "conv_lstm": [("conv_lstm", "rnn_dropout", 0.3),
                  ("conv_lstm", "rnn_recurrent_dropout", 0.3)],
    "gaussian": [("gdrop", "gaussian_dropout", 0.3)],
    "alpha": [("adrop", "alpha_dropout", 0.3)],
    "custom_layer": [("block/dropout", "dropout", 0.3)],
}


def _listing(model):
  return [tuple(s) for s in dv.dropout_sources(model)]


def _with_layer(layer, shape=(tm.NUM_FEATURES,)):
  """A model with `layer` between two Dense layers, and a Dropout."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input(shape)
  h = layer(keras.layers.Dense(4, name="dense")(inputs))
  h = keras.layers.Dropout(0.2, name="drop")(h)
  return keras.Model(inputs, keras.layers.Dense(1)(h), name="with_layer")


class _Seeded(keras.layers.Layer):
  """A custom layer that draws its own random numbers."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.seed_generator = keras.random.SeedGenerator(0)

  def call(self, inputs, training=None):
    if training:
      return inputs + keras.random.normal(keras.ops.shape(inputs),
                                          seed=self.seed_generator)
    return inputs


class _Holder(keras.layers.Layer):
  """A custom layer holding another one."""

  def __init__(self, inner, **kwargs):
    super().__init__(**kwargs)
    self.inner = inner

  def call(self, inputs):
    return self.inner(inputs)


class DropoutSourcesTest(tf.test.TestCase):

  def test_lists_every_kind_with_path_and_rate(self):
    for kind, expected in _EXPECTED.items():
      model = tm.source_model(kind)
      self.assertEqual(_listing(model), expected, msg=kind)

  def test_dropout_only_models_keep_their_layer_indices(self):
    for kind in ("softmax", "nested", "cnn", "recommender"):
      model = tm.build(kind)
      found = sources.find_sources(model)
      self.assertEqual([f.layer for f in found],
                       keras_graph.dropout_layers(model), msg=kind)
      self.assertEqual([f.index for f in found], list(range(len(found))))

  def test_subclassed_models_bare_and_wrapped(self):
    self.assertEqual(_listing(tm.subclassed_regressor()),
                     [("drop_a", "dropout", 0.3), ("drop_b", "dropout", 0.3)])
    self.assertEqual(_listing(tm.source_model("wrapped_subclassed")),
                     [("inner/drop_a", "dropout", 0.3),
                      ("inner/drop_b", "dropout", 0.3)])

  def test_zero_rate_attention_and_rnn_are_not_sources(self):
    inputs = keras.Input((4, 3))
    h = keras.layers.MultiHeadAttention(2, 2, name="mha")(inputs, inputs)
    h = keras.layers.LSTM(4, name="lstm")(h)
    h = keras.layers.Dropout(0.0, name="drop")(h)
    model = keras.Model(inputs, h)
    self.assertEqual(_listing(model), [("drop", "dropout", 0.0)])

  def test_stacked_cells_are_listed_per_cell(self):
    cells = [keras.layers.LSTMCell(4, dropout=0.2, name="c0"),
             keras.layers.GRUCell(4, recurrent_dropout=0.1, name="c1")]
    inputs = keras.Input((5, 3))
    outputs = keras.layers.RNN(cells, name="stack")(inputs)
    self.assertEqual(_listing(keras.Model(inputs, outputs)),
                     [("stack/c0", "rnn_dropout", 0.2),
                      ("stack/c1", "rnn_recurrent_dropout", 0.1)])

  def test_models_with_only_other_sources_are_accepted(self):
    for kind in ("gaussian", "alpha", "custom_layer", "lstm"):
      model = tm.source_model(kind)
      self.assertIs(sources.check_dropout_model(model), model, msg=kind)

  def test_augmentation_layers_are_left_alone(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.RandomFlip(name="flip")(inputs)
    h = keras.layers.RandomRotation(0.1, name="rotate")(h)
    h = keras.layers.Dropout(0.2, name="drop")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    self.assertEqual(_listing(model), [("drop", "dropout", 0.2)])


class RefusalTest(tf.test.TestCase):

  def _assert_refused(self, model, path, cls):
    with self.assertRaises(ValueError) as e:
      dv.dropout_sources(model)
    self.assertEqual(str(e.exception), _REFUSAL.format(path=path, cls=cls))
    with self.assertRaises(ValueError) as e:
      sources.check_dropout_model(model)
    self.assertEqual(str(e.exception), _REFUSAL.format(path=path, cls=cls))

  def test_gaussian_noise(self):
    self._assert_refused(
        _with_layer(keras.layers.GaussianNoise(0.1, name="noise")), "noise",
        "GaussianNoise")

  def test_attention_dropout_of_keras_attention(self):
    inputs = keras.Input((4, 3))
    h = keras.layers.Attention(dropout=0.1, name="att")([inputs, inputs])
    h = keras.layers.Dropout(0.2)(h)
    self._assert_refused(keras.Model(inputs, h), "att", "Attention")

  def test_random_layer_deep_inside_custom_layers(self):
    model = _with_layer(_Holder(_Holder(_Seeded(name="seeded"), name="mid"),
                                name="outer"), shape=(4,))
    self._assert_refused(model, "outer/mid/seeded", "_Seeded")

  def test_not_a_model(self):
    with self.assertRaisesRegex(ValueError, "Expected a `keras.Model`"):
      dv.dropout_sources(keras.layers.Dense(2))


class RegistryTest(tf.test.TestCase):

  def tearDown(self):
    dv.unregister_dropout_source(_Seeded)
    dv.unregister_dropout_source(tm.NoisyMask)
    super().tearDown()

  def test_registered_class_is_a_source(self):
    model = tm.source_model("registered")
    self._assert_refused_unregistered(model)
    dv.register_dropout_source(tm.NoisyMask, tm.noisy_mask_noise,
                               kind="noisy_mask")
    self.assertEqual(_listing(model), [("noisy", "noisy_mask", 0.3)])
    dv.register_dropout_source(tm.NoisyMask, tm.noisy_mask_noise)
    self.assertEqual(_listing(model), [("noisy", "custom", 0.3)])
    dv.unregister_dropout_source(tm.NoisyMask)
    self._assert_refused_unregistered(model)

  def _assert_refused_unregistered(self, model):
    with self.assertRaisesRegex(ValueError, "layer 'noisy' of class "
                                "NoisyMask, which draws random numbers"):
      dv.dropout_sources(model)

  def test_registered_class_without_rate(self):
    dv.register_dropout_source(_Seeded, lambda layer, x, u: x + u - 0.5)
    model = _with_layer(_Seeded(name="seeded"), shape=(4,))
    self.assertEqual(_listing(model), [("seeded", "custom", None),
                                       ("drop", "dropout", 0.2)])

  def test_invalid_arguments(self):
    for args, kwargs, arg in [
        ((int, tm.noisy_mask_noise), {}, "layer_class"),
        ((tm.NoisyMask, "f"), {}, "noise_fn"),
        ((tm.NoisyMask, tm.noisy_mask_noise), {"kind": "dropout"}, "kind"),
        ((tm.NoisyMask, tm.noisy_mask_noise), {"kind": ""}, "kind")]:
      with self.assertRaisesRegex(
          ValueError, f"Invalid value received for argument `{arg}`"):
        dv.register_dropout_source(*args, **kwargs)


if __name__ == "__main__":
  tf.test.main()
