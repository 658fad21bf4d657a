"""Tests for dropvar_tf.keras_graph (Keras graph introspection)."""

import os
import sys

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testing_models as tm


def _shared_layer_model():
  """x -> dense_a -> drop -> shared -> shared (same layer twice) -> out."""
  inputs = keras.Input((4,), name="x")
  h = keras.layers.Dense(4, activation="relu", name="dense_a")(inputs)
  h = keras.layers.Dropout(0.2, name="drop")(h)
  shared = keras.layers.Dense(4, name="shared")
  h = shared(shared(h))
  return keras.Model(inputs, keras.layers.Dense(1, name="out")(h))


class ModelsTest(tf.test.TestCase):

  def test_is_graph_model(self):
    for kind in ("softmax", "binary_bn", "recommender", "nested"):
      with self.subTest(kind=kind):
        self.assertTrue(keras_graph.is_graph_model(tm.build(kind)))
    self.assertFalse(keras_graph.is_graph_model(tm.subclassed()))

  def test_functional_view_of_graph_models_is_the_model(self):
    for kind in ("softmax", "nested"):
      model = tm.build(kind)
      self.assertEqual(keras_graph.functional_view(model), (model, {}))

  def test_functional_view_shares_the_subclassed_models_layers(self):
    bare = tm.subclassed_regressor()
    view, paths = keras_graph.functional_view(bare)
    self.assertTrue(keras_graph.is_graph_model(view))
    self.assertIs(view.get_layer("dense_a"), bare.dense_a)
    self.assertEqual(sorted(paths.values()),
                     ["dense_a", "dense_b", "drop_a", "drop_b", "value"])
    x = tm.target_features(5)
    self.assertAllEqual(view(x), bare(x))
    wrapped = tm.source_model("wrapped_subclassed")
    view, paths = keras_graph.functional_view(wrapped)
    inner = wrapped.get_layer("inner")
    self.assertIs(view.get_layer("dense_b"), inner.dense_b)
    self.assertEqual(paths[id(inner.dense_b)], "inner/dense_b")
    self.assertAllEqual(view(x), wrapped(x))

  def test_as_functional_wraps_a_subclassed_model_as_one_node(self):
    bare = tm.subclassed_regressor()
    wrapper = keras_graph.as_functional(bare)
    self.assertEqual([l.name for l in wrapper.layers],
                     ["inputs", "subclassed_regressor"])
    self.assertEqual(tuple(wrapper.outputs[0].shape), (None, 1))
    model = tm.regression()
    self.assertIs(keras_graph.as_functional(model), model)

  def test_output_names_and_select_outputs(self):
    self.assertIsNone(keras_graph.output_names(tm.mlp_softmax()))
    # (names, output widths in that order): "value" has 1 unit, "klass" 3.
    cases = {"dict": (["klass", "value"], [3, 1]),
             "list": (["value", "klass"], [1, 3]),
             "subclassed": (["output_0", "output_1"], [1, 3])}
    for kind, (names, widths) in cases.items():
      with self.subTest(kind):
        model = tm.multi_output(kind)
        self.assertEqual(keras_graph.output_names(model), names)
        selected = keras_graph.select_outputs(
            keras_graph.output_structure(model), names)
        self.assertEqual([int(t.shape[-1]) for t in selected], widths)

  def test_model_input_of_sequential_functional_and_dict_models(self):
    sequential = tm.mlp_softmax()
    self.assertIs(keras_graph.model_input(sequential), sequential.inputs[0])
    functional = tm.binary_bn()
    self.assertIs(keras_graph.model_input(functional), functional.input)
    recommender = tm.recommender()
    self.assertEqual(sorted(keras_graph.model_input(recommender)),
                     ["movie_id", "user_id"])

  def test_iter_layers_descends_into_nested_models(self):
    model = tm.nested()
    names = [l.name for l in keras_graph.iter_layers(model)]
    block = model.get_layer("block")
    self.assertNotIn("block", names)
    for layer in block.layers:
      self.assertIn(layer.name, names)

  def test_dropout_layers_include_nested_and_subclasses(self):
    model = tm.nested()
    dropouts = keras_graph.dropout_layers(model)
    self.assertNotEmpty(dropouts)
    self.assertTrue(all(isinstance(l, keras.layers.Dropout)
                        for l in dropouts))
    nested = [l for l in model.get_layer("block").layers
              if isinstance(l, keras.layers.Dropout)]
    for layer in nested:
      self.assertIn(layer, dropouts)
    spatial = keras_graph.dropout_layers(tm.cnn())
    self.assertTrue(any(isinstance(l, keras.layers.SpatialDropout2D)
                        for l in spatial))
    self.assertEmpty(keras_graph.dropout_layers(tm.no_dropout()))


class GraphTest(tf.test.TestCase):

  def test_sublayers_of_models_and_custom_layers(self):
    model = tm.source_model("transformer")
    self.assertEqual(keras_graph.sublayers(model), model.layers)
    block = model.get_layer("encoder").get_layer("block_1")
    self.assertEqual([layer.name for layer in keras_graph.sublayers(block)],
                     ["attention", "drop", "ffn"])
    self.assertEqual(keras_graph.sublayers(keras.layers.Dense(2)), [])

  def test_random_layers_and_rnn_cells(self):
    self.assertTrue(keras_graph.owns_seed_generator(
        keras.layers.GaussianNoise(0.1)))
    self.assertFalse(keras_graph.owns_seed_generator(keras.layers.Dense(2)))
    self.assertTrue(keras_graph.is_data_layer(keras.layers.RandomFlip()))
    self.assertFalse(keras_graph.is_data_layer(keras.layers.Dropout(0.1)))
    lstm = keras.layers.LSTMCell(3, recurrent_dropout=0.1)
    self.assertTrue(keras_graph.is_dropout_rnn_cell(lstm))
    self.assertFalse(keras_graph.is_dropout_rnn_cell(keras.layers.Dense(2)))
    self.assertEqual(keras_graph.rnn_mask_count(lstm), 4)
    self.assertIsNone(keras_graph.rnn_mask_count(keras.layers.LSTMCell(3)))
    self.assertEqual(keras_graph.rnn_mask_count(
        keras.layers.GRUCell(3, recurrent_dropout=0.1)), 3)
    self.assertIsNone(keras_graph.rnn_mask_count(
        keras.layers.SimpleRNNCell(3, recurrent_dropout=0.1)))
    self.assertEqual(keras_graph.rnn_mask_count(
        keras.layers.ConvLSTM1D(2, 2).cell), 4)

  def test_source_layer(self):
    model = tm.binary_bn()
    self.assertIs(keras_graph.source_layer(model.outputs[0]),
                  model.get_layer("prob"))
    self.assertIs(keras_graph.source_layer(model.get_layer("bn").output),
                  model.get_layer("bn"))

  def test_graph_nodes_count_calls_in_this_model_only(self):
    model = _shared_layer_model()
    nodes = keras_graph.graph_nodes(model)
    self.assertLen(nodes[id(model.get_layer("shared"))], 2)
    dense_calls = nodes[id(model.get_layer("dense_a"))]
    self.assertLen(dense_calls, 1)
    inputs, outputs = dense_calls[0]
    self.assertIs(inputs[0], model.inputs[0])
    self.assertIs(outputs[0], model.get_layer("dense_a").output)
    # Calling a layer in another graph adds no node to this model's map.
    model.get_layer("dense_a")(keras.Input((4,)))
    self.assertLen(keras_graph.graph_nodes(model)[
        id(model.get_layer("dense_a"))], 1)

  def test_output_is_probabilities(self):
    inputs = keras.Input((4,))
    for output, expected in [
        (keras.layers.Dense(3, activation="softmax"), True),
        (keras.layers.Softmax(), True),
        (keras.layers.Dense(3), False),
        (keras.layers.Dense(3, activation="sigmoid"), False),
        (keras.Sequential([keras.layers.Dense(3)]), True)]:  # unseen: classes
      with self.subTest(output=output.name):
        model = keras.Model(inputs, output(inputs))
        self.assertEqual(keras_graph.output_is_probabilities(model), expected)

  def test_run_through_graph_calls_back_for_every_node(self):
    model = tm.binary_bn()
    seen = []

    def call(layer, *args, **kwargs):
      seen.append(layer.name)
      return layer(*args, **kwargs)

    x = tm.sample_inputs("binary_bn", 5)
    out = keras_graph.run_through_graph(model, [tf.constant(x)], call)
    self.assertAllClose(out, model(x, training=False))
    self.assertEqual(seen, [l.name for l in model.layers[1:]])


class CalledOnTensorAloneTest(tf.test.TestCase):

  def test_options_other_than_inference_training_count(self):
    inputs = keras.Input((4,))
    plain = keras.layers.Dense(3)(inputs)
    inference = keras.layers.Dropout(0.2)(plain, training=False)
    forced = keras.layers.Dropout(0.2)(plain, training=True)
    merged = keras.layers.Add()([plain, inference])
    self.assertTrue(keras_graph.called_on_tensor_alone(plain))
    self.assertTrue(keras_graph.called_on_tensor_alone(inference))
    self.assertFalse(keras_graph.called_on_tensor_alone(forced))
    # One positional argument, a list: how many tensors is graph_nodes'.
    self.assertTrue(keras_graph.called_on_tensor_alone(merged))
    # Sequential records training=False on every call.
    model = tm.mlp_softmax()
    for layer in model.layers:
      self.assertTrue(keras_graph.called_on_tensor_alone(layer.output))


class LayerStateTest(tf.test.TestCase):

  def test_untracked_attribute_leaves_variables_alone(self):
    holder = keras.layers.Layer(trainable=False)
    variable = keras.Variable(np.ones(2, "float32"), trainable=True)
    keras_graph.set_untracked_attribute(holder, "held", {"v": variable})
    self.assertIs(holder.held["v"], variable)
    self.assertEmpty(holder.weights)
    self.assertTrue(variable.trainable)

  def test_shared_weight_is_listed_not_changed(self):
    holder = keras.layers.Layer(trainable=False)
    variable = keras.Variable(np.ones(2, "float32"), trainable=True)
    keras_graph.add_shared_weight(holder, variable)
    self.assertEqual([id(w) for w in holder.non_trainable_weights],
                     [id(variable)])
    self.assertTrue(variable.trainable)


class TensorFlowTest(tf.test.TestCase):

  def test_in_xla_context(self):
    self.assertFalse(keras_graph.in_xla_context())
    seen = {}

    def probe(jit_compile):
      def fn(x):
        seen[jit_compile] = keras_graph.in_xla_context()
        return x
      tf.function(fn, jit_compile=jit_compile)(tf.constant(1.0))

    probe(False)
    probe(True)
    self.assertEqual(seen, {False: False, True: True})

  def test_is_registered_op(self):
    self.assertTrue(keras_graph.is_registered_op("MatMul"))
    self.assertTrue(keras_graph.is_registered_op("EagerPyFunc"))
    self.assertFalse(keras_graph.is_registered_op("NoSuchOpAnywhere"))


class SessionCallableTest(tf.test.TestCase):

  def test_feeds_fetches_and_targets_by_name(self):
    graph = tf.Graph()
    with graph.as_default():
      x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
      words = tf.compat.v1.placeholder(tf.string, [None], name="words")
      counter = tf.Variable(0, name="counter")
      increment = tf.compat.v1.assign_add(counter, 1, name="increment")
      tf.identity(2.0 * x, name="doubled")
      tf.strings.length(words, name="lengths")
      init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(init)
      run = keras_graph.session_callable(
          session, ["x:0", "words:0"], ["doubled:0", "lengths:0"],
          targets=[increment.op.name])
      got_doubled, got_lengths = run(
          np.array([[1.0, 2.0]], np.float32),
          np.array([b"ab", b"abcd"], dtype=object))
      self.assertAllEqual(got_doubled, [[2.0, 4.0]])
      self.assertAllEqual(got_lengths, [2, 4])
      self.assertEqual(session.run(counter), 1)


if __name__ == "__main__":
  tf.test.main()
