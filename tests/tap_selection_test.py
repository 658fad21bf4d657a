"""Tests for dropvar_tf.tap_selection (the default `layers="auto"`)."""

import os
import sys

import numpy as np

from dropvar_tf import heads
from dropvar_tf import tap_selection
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm

_PREFIX = "Invalid value received for argument "
_ERR_MAX_LAYERS = _PREFIX + ("`max_layers`. Expected an integer >= 1. "
                             "Received: max_layers=0")
_ERR_MIN_LAYERS = _PREFIX + ("`min_layers`. Expected an integer <= "
                             "max_layers=2. Received: min_layers=3")
_ERR_MAX_COST = _PREFIX + "`max_cost`. Expected a finite number > 0. "
_ERR_LAYERS = _PREFIX + ("`layers`. Expected \"auto\", \"all\", \"last\", or "
                         "a non-empty list of layer names. Received: "
                         "layers=['dense_a', 3]")
_ERR_FEATURES = _PREFIX + ("`features`. Expected one of ('auto', "
                            "'neurons', 'summary'). Received: "
                            "features='mean'")
_SMALL_HEAD = dict(hidden_units=(8,))


def _deep_cnn(seed=0, convs=8):
  """A CNN with `convs` ReLU convs on 16x16 maps, Dropout only at the top."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((16, 16, 3), name="image")
  h = inputs
  for i in range(convs):
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu",
                            name=f"conv_{i}")(h)
  h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
  h = keras.layers.Dense(32, activation="relu", name="dense")(h)
  h = keras.layers.Dropout(0.3, name="top_dropout")(h)
  outputs = keras.layers.Dense(4, activation="softmax", name="out")(h)
  return keras.Model(inputs, outputs, name="deep_cnn")


def _dropout_far_from_output(seed=0):
  """An MLP whose first layer feeds a Dropout; the later ones do not."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((8,), name="x")
  h = keras.layers.Dense(8, activation="relu", name="fed_to_dropout")(inputs)
  h = keras.layers.Dropout(0.3, name="drop")(h)
  for i in range(4):
    h = keras.layers.Dense(8, activation="relu", name=f"plain_{i}")(h)
  outputs = keras.layers.Dense(1, name="out")(h)
  return keras.Model(inputs, outputs, name="dropout_far")


def _names(layers):
  return [l.name for l in layers]


def _probe_total(model, layers, features="summary"):
  nodes = {l.name: l.output for l in model.layers}
  return sum(tap_selection.probe_cost(nodes[l.name].shape, features)
             for l in layers)


class CostTest(tf.test.TestCase):

  def test_dense_and_conv_cost(self):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)  # 4x4x4 out
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, name="dense")(h)
    model = keras.Model(inputs, outputs)
    read = tap_selection.READ_COST
    conv = (3 * 3 * 2 * 4 + 4) * 36 + read * 64  # kernel at 6x6 positions
    flat = read * 64
    dense = (64 * 3 + 3) + read * 3
    self.assertEqual(tap_selection.model_cost(model), conv + flat + dense)

  def test_embedding_and_rnn_cost(self):
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(1000, 4, name="embedding")(inputs)
    outputs = keras.layers.SimpleRNN(3, name="rnn")(h)
    model = keras.Model(inputs, outputs)
    read = tap_selection.READ_COST
    # A lookup costs its output, not its table; an RNN runs at every step.
    expected = read * 20 + (4 * 3 + 3 * 3 + 3) * 5 + read * 3
    self.assertEqual(tap_selection.model_cost(model), expected)

  def test_keras_op_in_the_graph_costs_its_output(self):
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 4, name="embedding")(inputs)
    h = keras.ops.sum(h, axis=1)  # an Operation, not a Layer
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    outputs = keras.layers.Dense(1, name="dense")(h)
    model = keras.Model(inputs, outputs)
    read = tap_selection.READ_COST
    expected = (read * 20 + read * 4 + (4 * 8 + 8) + read * 8 + read * 8 +
                (8 + 1) + read * 1)
    self.assertEqual(tap_selection.model_cost(model), expected)
    dual = heads.add_variation_head(model)
    self.assertIn("variation", dual(np.zeros((2, 5), "int32")))

  def test_nested_model_is_estimated_layer_by_layer(self):
    model = tm.nested()
    inner = model.get_layer("block")
    self.assertEqual(
        tap_selection.layer_cost(inner, [inner.input], [inner.output]),
        tap_selection.model_cost(inner))
    self.assertGreater(tap_selection.model_cost(model),
                       tap_selection.model_cost(inner))

  def test_probe_cost(self):
    read = tap_selection.READ_COST
    width = tap_selection.HEAD_WIDTH
    summary = read * tap_selection.SUMMARY_READS * 64 + width * 3
    self.assertEqual(tap_selection.probe_cost((None, 4, 4, 4), "summary"),
                     summary)
    self.assertEqual(tap_selection.probe_cost((None, 4, 4, 4), "neurons"),
                     read * 64 + width * 4)
    # Rank-2 neurons feed the head as they are: only its first layer.
    self.assertEqual(tap_selection.probe_cost((None, 64), "neurons"),
                     width * 64)


class SelectLayersTest(tf.test.TestCase):

  def test_auto_is_the_default(self):
    model = _deep_cnn()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    chosen = tap_selection.select_layers(model, heads.candidate_layers(model))
    self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                     _names(chosen))

  def test_big_model_gets_few_layers_near_the_output_within_budget(self):
    model = _deep_cnn()
    candidates = heads.candidate_layers(model)
    self.assertLen(candidates, 9)
    chosen = tap_selection.select_layers(model, candidates)
    # The layer the top Dropout reads first, then the nearest the output.
    self.assertEqual(_names(chosen), ["conv_5", "conv_6", "conv_7", "dense"])
    self.assertLessEqual(len(chosen), tap_selection.MAX_LAYERS)
    budget = tap_selection.MAX_COST * tap_selection.model_cost(model)
    self.assertLessEqual(_probe_total(model, chosen), budget)
    self.assertGreater(_probe_total(model, candidates), budget)

  def test_more_budget_and_layers_take_more(self):
    model = _deep_cnn()
    candidates = heads.candidate_layers(model)
    chosen = tap_selection.select_layers(model, candidates, max_layers=9,
                                         max_cost=10.0)
    self.assertEqual(_names(chosen), _names(candidates))
    one = tap_selection.select_layers(model, candidates, max_layers=1,
                                      min_layers=1)
    self.assertEqual(_names(one), ["dense"])

  def test_cheap_features_fit_more_layers_on_feature_maps(self):
    model = _deep_cnn()
    candidates = heads.candidate_layers(model)
    # At 2% a second 16x16 map's summary is over the budget; per-channel
    # means, one pass over each map, fit three.
    summary = tap_selection.select_layers(model, candidates, "summary",
                                          max_cost=0.02)
    neurons = tap_selection.select_layers(model, candidates, "neurons",
                                          max_cost=0.02)
    self.assertEqual(_names(summary), ["conv_7", "dense"])
    self.assertEqual(_names(neurons), ["conv_5", "conv_6", "conv_7", "dense"])
    budget = 0.02 * tap_selection.model_cost(model)
    self.assertLessEqual(_probe_total(model, summary), budget)
    self.assertLessEqual(_probe_total(model, neurons, "neurons"), budget)

  def test_min_layers_are_taken_whatever_they_cost(self):
    model = _deep_cnn()
    candidates = heads.candidate_layers(model)
    chosen = tap_selection.select_layers(model, candidates, max_cost=1e-9)
    self.assertEqual(_names(chosen), ["conv_7", "dense"])

  def test_layers_a_dropout_reads_come_first(self):
    model = _dropout_far_from_output()
    candidates = heads.candidate_layers(model)
    chosen = tap_selection.select_layers(model, candidates, max_layers=2,
                                         max_cost=1e-9)
    self.assertEqual(_names(chosen), ["fed_to_dropout", "plain_3"])

  def test_deterministic(self):
    first = _deep_cnn(seed=0)
    again = tap_selection.select_layers(first,
                                        heads.candidate_layers(first))
    for seed in (0, 1):
      model = _deep_cnn(seed=seed)
      with self.subTest(seed=seed):
        self.assertEqual(
            _names(tap_selection.select_layers(
                model, heads.candidate_layers(model))), _names(again))

  def test_small_model_keeps_every_layer_and_the_same_outputs(self):
    model = tm.mlp_softmax()
    x = tm.sample_inputs("mlp_softmax", 5)
    auto = heads.add_variation_head(model, **_SMALL_HEAD)
    every = heads.add_variation_head(model, layers="all", **_SMALL_HEAD)
    self.assertEqual(heads.variation_head_metadata(auto)["layers"],
                     ["dense_a", "dense_b"])
    out_auto, out_all = auto(x), every(x)
    for key in out_all:
      self.assertAllEqual(out_auto[key], out_all[key])

  def test_all_and_named_layers_are_unchanged(self):
    model = _deep_cnn()
    for layers, expected in [
        ("all", _names(heads.candidate_layers(model))),
        ("last", ["dense"]),
        (["conv_0", "conv_3"], ["conv_0", "conv_3"])]:
      with self.subTest(layers=layers):
        dual = heads.add_variation_head(model, layers=layers, **_SMALL_HEAD)
        self.assertEqual(heads.variation_head_metadata(dual)["layers"],
                         expected)

  def test_empty_candidates_give_empty_selection(self):
    model = _deep_cnn()
    self.assertEqual(tap_selection.select_layers(model, []), [])

  def test_bad_arguments_raise(self):
    model = _deep_cnn()
    candidates = heads.candidate_layers(model)
    for kwargs, message in [
        (dict(max_layers=0), _ERR_MAX_LAYERS),
        (dict(max_layers=2, min_layers=3), _ERR_MIN_LAYERS),
        (dict(max_cost=0), _ERR_MAX_COST + "Received: max_cost=0"),
        (dict(max_cost=float("inf")),
         _ERR_MAX_COST + "Received: max_cost=inf"),
        (dict(max_cost="10%"), _ERR_MAX_COST + "Received: max_cost='10%'"),
        (dict(max_cost=True), _ERR_MAX_COST + "Received: max_cost=True")]:
      with self.subTest(kwargs=kwargs):
        with self.assertRaises(ValueError) as cm:
          tap_selection.select_layers(model, candidates, **kwargs)
        self.assertEqual(str(cm.exception), message)

  def test_bad_layers_argument_raises(self):
    with self.assertRaises(ValueError) as cm:
      heads.add_variation_head(tm.mlp_softmax(), layers=["dense_a", 3])
    self.assertEqual(str(cm.exception), _ERR_LAYERS)

  def test_default_dual_has_one_probe_per_chosen_layer(self):
    model = _deep_cnn()
    dual = heads.add_variation_head(model, **_SMALL_HEAD)
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    out = dual(x)
    self.assertEqual(tuple(out["variation"].shape), (2,))
    probes = [l for l in dual.layers if l.name.startswith(heads.PROBE_PREFIX)]
    self.assertCountEqual(
        [p.name for p in probes],
        [heads.PROBE_PREFIX + n for n in ("conv_5", "conv_6", "conv_7",
                                          "dense")])


class ProbeFeaturesTest(tf.test.TestCase):

  def test_auto_reads_a_recurrent_final_state_per_neuron(self):
    for kind, name in (("lstm", "lstm"), ("gru", "gru"),
                       ("simple_rnn", "rnn"), ("bidirectional", "bidir")):
      with self.subTest(kind):
        layer = tm.source_model(kind).get_layer(name)
        self.assertLen(layer.output.shape, 2)
        self.assertEqual(
            tap_selection.probe_features(layer, layer.output.shape),
            "neurons")

  def test_auto_summarises_other_layers_and_recurrent_sequences(self):
    model = tm.source_model("lstm")
    dense = model.get_layer("dense")
    sequences = keras.layers.LSTM(4, return_sequences=True)
    outputs = sequences(keras.Input((tm.SEQ_LEN, tm.SEQ_FEATURES)))
    conv_lstm = tm.source_model("conv_lstm").get_layer("conv_lstm")
    for layer, shape in ((dense, dense.output.shape),
                         (sequences, outputs.shape),
                         (conv_lstm, conv_lstm.output.shape)):
      with self.subTest(layer.name):
        self.assertEqual(tap_selection.probe_features(layer, shape),
                         "summary")

  def test_explicit_features_apply_to_every_layer(self):
    model = tm.source_model("lstm")
    for name in ("lstm", "dense"):
      layer = model.get_layer(name)
      for features in ("summary", "neurons"):
        with self.subTest(name=name, features=features):
          self.assertEqual(tap_selection.probe_features(
              layer, layer.output.shape, features), features)

  def test_auto_head_of_a_recurrent_model(self):
    # The default selection (both candidates of this small model) and
    # features.
    dual = heads.add_variation_head(tm.source_model("lstm"), **_SMALL_HEAD)
    meta = heads.variation_head_metadata(dual)
    self.assertEqual(meta["features"], "auto")
    self.assertEqual(dict(zip(meta["layers"], meta["layer_features"])),
                     {"lstm": "neurons", "dense": "summary"})
    # 8 LSTM units, 3 summary numbers of the Dense layer.
    for name, width in (("lstm", 8), ("dense", 3)):
      probe = dual.get_layer(heads.PROBE_PREFIX + name)
      self.assertEqual(tuple(probe.output.shape), (None, width))

  def test_bad_features_raise(self):
    layer = tm.source_model("lstm").get_layer("lstm")
    for call in (
        lambda: tap_selection.probe_features(layer, layer.output.shape,
                                             "mean"),
        lambda: tap_selection.select_layers(tm.source_model("lstm"), [layer],
                                            features="mean"),
        lambda: heads.add_variation_head(tm.source_model("lstm"),
                                         features="mean")):
      with self.assertRaises(ValueError) as cm:
        call()
      self.assertEqual(str(cm.exception), _ERR_FEATURES)


if __name__ == "__main__":
  tf.test.main()
