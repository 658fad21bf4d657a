"""Tests for dropvar_tf.models (reference base models)."""

import os

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf import sources
from dropvar_tf._keras import keras, tf
from dropvar_tf.study.data import common
from dropvar_tf.study.data import criteo
from dropvar_tf.study.models import reference


def _rates(model):
  return {l.name: l.rate for l in keras_graph.dropout_layers(model)}


def _movielens_split(n=400, seed=0):
  rng = np.random.default_rng(seed)
  users, movies = rng.integers(1, 30, n), rng.integers(1, 50, n)
  # A learnable rating: user bias + movie bias.
  y = (3 + (users % 3 - 1) * 0.8 + (movies % 2) * 0.5).astype(np.float32)
  x = {"user_id": users.astype(np.int64), "movie_id": movies.astype(np.int64)}
  train, test = common.split_indices(n, 0.25, seed)
  return common.Split(common.take(x, train), y[train], common.take(x, test),
                      y[test], {"kind": common.REGRESSION})


def _image_split(n=120, shape=(8, 8, 1), classes=3, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  x = rng.normal(0, 0.1, (n,) + shape).astype(np.float32)
  x.reshape(n, -1)[np.arange(n), y] += 1.0  # class k lights pixel k
  train, test = common.split_indices(n, 0.25, seed)
  return common.Split(x[train], y[train], x[test], y[test],
                      {"kind": common.MULTICLASS})


class MovieLensModelTest(tf.test.TestCase):

  def test_structure(self):
    model = reference.movielens_model(30, 50, embedding_dim=8, hidden=(16, 8),
                                      dropout_rate=(0.2, 0.4))
    self.assertEqual(_rates(model), {"dropout_0": 0.2, "dropout_1": 0.4})
    self.assertEqual(model.get_layer("hidden_0").units, 16)
    self.assertEqual(model.get_layer("hidden_1").units, 8)
    self.assertEqual(model.get_layer("user_embedding").input_dim, 30)
    self.assertEqual(model.get_layer("movie_embedding").input_dim, 50)
    self.assertEqual(sorted(t.name for t in model.inputs),
                     ["movie_id", "user_id"])
    self.assertEqual(model.get_layer("output").activation,
                     keras.activations.linear)
    sources.check_dropout_model(model)

  def test_trains_one_epoch(self):
    split = _movielens_split()
    model = reference.movielens_model(30, 50, embedding_dim=8, hidden=(16,),
                                      seed=0)
    history = reference.train_base_model(model, split, epochs=1,
                                         batch_size=64, seed=0)
    self.assertIn("val_rmse", history.history)
    self.assertTrue(np.isfinite(history.history["loss"][0]))
    out = model.predict(split.x_test, verbose=0)
    self.assertEqual(out.shape, (len(split.y_test), 1))

  def test_seed_makes_builds_identical(self):
    x = {"user_id": np.arange(5, dtype=np.int64),
         "movie_id": np.arange(5, dtype=np.int64)}
    a = reference.movielens_model(10, 10, seed=3)(x)
    b = reference.movielens_model(10, 10, seed=3)(x)
    c = reference.movielens_model(10, 10, seed=4)(x)
    self.assertAllEqual(a, b)
    self.assertNotAllClose(a, c)


class CriteoModelTest(tf.test.TestCase):

  def test_structure_and_learning_on_synthetic_data(self):
    split = criteo.make_synthetic_criteo(6000, seed=0, num_buckets=200)
    model = reference.criteo_model(split.info["num_buckets"], embedding_dim=4,
                                   hidden=(32, 16), dropout_rate=0.25, seed=0)
    self.assertEqual(_rates(model), {"dropout_0": 0.25, "dropout_1": 0.25})
    self.assertEqual(model.get_layer("cat_embedding").input_dim, 26 * 200)
    self.assertEqual(model.get_layer("output").activation,
                     keras.activations.sigmoid)
    history = reference.train_base_model(model, split, epochs=2,
                                         batch_size=128, seed=0)
    probs = model.predict(split.x_test, verbose=0)
    self.assertEqual(probs.shape, (len(split.y_test), 1))
    self.assertAllInRange(probs, 0.0, 1.0)
    # The synthetic click model is learnable well above chance.
    self.assertGreater(history.history["val_auc"][-1], 0.6)

  def test_columns_get_separate_rows(self):
    layer = reference.CategoricalOffsets([3, 5, 2])
    self.assertAllEqual(layer(np.array([[0, 0, 0], [2, 4, 1]])),
                        [[0, 3, 8], [2, 7, 9]])
    self.assertEqual(
        reference.CategoricalOffsets.from_config(layer.get_config())
        .vocab_sizes, [3, 5, 2])

  def test_keras_round_trip(self):
    model = reference.criteo_model([7] * 26, embedding_dim=2, hidden=(8,),
                                   seed=1)
    x = {"dense": np.ones((4, 13), np.float32),
         "cat": np.tile(np.arange(26) % 7, (4, 1)).astype(np.int64)}
    path = os.path.join(self.get_temp_dir(), "criteo.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertAllClose(loaded.predict(x, verbose=0),
                        model.predict(x, verbose=0))


class ImageModelTest(tf.test.TestCase):

  def test_mlp(self):
    split = _image_split()
    model = reference.image_mlp((8, 8, 1), 3, hidden=(32, 32, 16),
                                dropout_rate=0.1, seed=0)
    self.assertEqual(_rates(model),
                     {"dropout_0": 0.1, "dropout_1": 0.1, "dropout_2": 0.1})
    self.assertEqual(model.get_layer("hidden_2").units, 16)
    reference.train_base_model(model, split, epochs=1, batch_size=32)
    probs = model.predict(split.x_test, verbose=0)
    self.assertEqual(probs.shape, (30, 3))
    self.assertAllClose(probs.sum(axis=1), np.ones(30), atol=1e-5)

  def test_cnn(self):
    split = _image_split()
    model = reference.image_cnn((8, 8, 1), 3, filters=(4, 8, 8), dense=16,
                                dropout_rate=0.5, seed=0)
    self.assertEqual(_rates(model), {"dropout_0": 0.5})
    self.assertEqual(model.get_layer("conv_2").filters, 8)
    # 8x8 pools to 4x4, 2x2, 1x1.
    self.assertEqual(model.get_layer("pool_2").output.shape[1:3], (1, 1))
    history = reference.train_base_model(model, split, epochs=1, batch_size=32)
    self.assertIn("val_accuracy", history.history)
    self.assertEqual(model.predict(split.x_test, verbose=0).shape, (30, 3))

  def test_flat_input(self):
    model = reference.image_mlp((64,), 10, hidden=(8,))
    self.assertEqual(model.output_shape, (None, 10))


class ValidationTest(tf.test.TestCase):

  def test_bad_arguments(self):
    cases = [
        (lambda: reference.movielens_model(0, 5), "num_users"),
        (lambda: reference.movielens_model(5, 5, hidden=()), "hidden"),
        (lambda: reference.movielens_model(5, 5, dropout_rate=1.0),
         "dropout_rate"),
        (lambda: reference.movielens_model(5, 5, hidden=(4, 4),
                                           dropout_rate=(0.1,)),
         "dropout_rate"),
        (lambda: reference.criteo_model(1), "num_buckets"),
        (lambda: reference.image_mlp((8, 8, 1), 1), "num_classes"),
        (lambda: reference.image_cnn((64,), 10), "input_shape"),
        (lambda: reference.compile_for_task(
            reference.image_mlp((4,), 2), "ranking"), "kind"),
        (lambda: reference.train_base_model(
            reference.image_mlp((4,), 2), (1, 2)), "split"),
    ]
    for fn, arg in cases:
      with self.assertRaisesRegex(
          ValueError, f"Invalid value received for argument `{arg}`"):
        fn()

  def test_compile_for_task_losses(self):
    for kind, loss in ((common.REGRESSION, "mean_squared_error"),
                       (common.BINARY, "binary_crossentropy"),
                       (common.MULTICLASS, "sparse_categorical_crossentropy")):
      model = reference.compile_for_task(reference.image_mlp((4,), 2), kind)
      self.assertEqual(model.loss, loss)


if __name__ == "__main__":
  tf.test.main()
