"""Reference base models, one per task kind, each trained with Dropout.

All are Functional Keras models with stable layer names, so that probes can
tap them by name:
- hidden Dense layers "hidden_0", "hidden_1", ... (post-activation, ReLU);
- each followed by a Dropout layer "dropout_0", "dropout_1", ...;
- convolutions "conv_0", ... and pools "pool_0", ... (`image_cnn`);
- embeddings "user_embedding", "movie_embedding" (`movielens_model`),
  "cat_embedding" (`criteo_model`);
- the output layer "output".

Widths and dropout rates are arguments. `dropout_rate` is one float for every
Dropout layer or one float per hidden layer. With `seed` set, initializers and
Dropout layers are seeded, so two builds with one seed are identical.
"""

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf.study.data import common
from dropvar_tf.validation import check_int, invalid

OUTPUT_NAME = "output"


def hidden_name(i):
  return f"hidden_{i}"


def dropout_name(i):
  return f"dropout_{i}"


class _Seeds:
  """Hands out distinct seeds derived from one seed, or None when unseeded."""

  def __init__(self, seed):
    self._seed = None if seed is None else check_int(seed, "seed", 0)
    self._count = 0

  def next(self):
    if self._seed is None:
      return None
    self._count += 1
    return self._seed * 1000 + self._count

  def kernel(self):
    return keras.initializers.GlorotUniform(seed=self.next())

  def embedding(self):
    return keras.initializers.RandomUniform(-0.05, 0.05, seed=self.next())


def _check_widths(hidden, arg="hidden"):
  if isinstance(hidden, (int, np.integer)):
    hidden = (hidden,)
  try:
    widths = tuple(check_int(h, arg, 1) for h in hidden)
  except (TypeError, ValueError):
    raise invalid(arg, "a non-empty sequence of integers >= 1",
                  hidden) from None
  if not widths:
    raise invalid(arg, "a non-empty sequence of integers >= 1", hidden)
  return widths


def _check_rates(dropout_rate, count):
  """Returns one dropout rate per hidden layer."""
  expected = (f"a float in [0, 1) or {count} such floats (one per hidden "
              "layer)")
  rates = (tuple(dropout_rate) if isinstance(dropout_rate, (list, tuple))
           else (dropout_rate,) * count)
  if len(rates) != count:
    raise invalid("dropout_rate", expected, dropout_rate)
  for r in rates:
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or (
        not 0.0 <= float(r) < 1.0):
      raise invalid("dropout_rate", expected, dropout_rate)
  return tuple(float(r) for r in rates)


def _mlp(x, widths, rates, seeds):
  """Stacks hidden_i (ReLU Dense) + dropout_i blocks on `x`."""
  for i, (width, rate) in enumerate(zip(widths, rates)):
    x = keras.layers.Dense(width, activation="relu", name=hidden_name(i),
                           kernel_initializer=seeds.kernel())(x)
    x = keras.layers.Dropout(rate, seed=seeds.next(), name=dropout_name(i))(x)
  return x


def movielens_model(num_users, num_movies, embedding_dim=32, hidden=(128, 64),
                    dropout_rate=0.3, seed=None, name="movielens_model"):
  """Rating regression: user and movie embeddings, then an MLP with Dropout.

  Args:
    num_users: user vocabulary size including the OOV id 0
      (`split.info["num_users"]`).
    num_movies: movie vocabulary size including the OOV id 0.
    embedding_dim: width of both embeddings.
    hidden: widths of the hidden Dense layers.
    dropout_rate: rate of the Dropout after each hidden layer (a float or one
      per layer).
    seed: seeds initializers and Dropout; None leaves them unseeded.
    name: model name.

  Returns:
    An uncompiled Functional model. Inputs: {"user_id": int64 (B,),
    "movie_id": int64 (B,)}; output: the rating, float32 (B, 1), linear.

  Raises:
    ValueError: on an invalid argument.

  Example:

  >>> model = movielens_model(944, 1683, hidden=(64,), dropout_rate=0.2)
  >>> model.output_shape
  (None, 1)
  """
  num_users = check_int(num_users, "num_users", 1)
  num_movies = check_int(num_movies, "num_movies", 1)
  embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
  widths = _check_widths(hidden)
  rates = _check_rates(dropout_rate, len(widths))
  seeds = _Seeds(seed)
  user = keras.Input(shape=(), dtype="int64", name="user_id")
  movie = keras.Input(shape=(), dtype="int64", name="movie_id")
  u = keras.layers.Embedding(num_users, embedding_dim, name="user_embedding",
                             embeddings_initializer=seeds.embedding())(user)
  m = keras.layers.Embedding(num_movies, embedding_dim,
                             name="movie_embedding",
                             embeddings_initializer=seeds.embedding())(movie)
  x = keras.layers.Concatenate(name="concat")([u, m])
  x = _mlp(x, widths, rates, seeds)
  out = keras.layers.Dense(1, name=OUTPUT_NAME,
                           kernel_initializer=seeds.kernel())(x)
  return keras.Model({"user_id": user, "movie_id": movie}, out, name=name)


@keras.saving.register_keras_serializable(package="dropvar_tf")
class CategoricalOffsets(keras.layers.Layer):
  """Shifts each column's ids into its own range of one shared table.

  Column j's ids in [0, vocab_sizes[j]) become
  sum(vocab_sizes[:j]) + id, so a single Embedding of sum(vocab_sizes) rows
  serves every column (one lookup instead of one per column).

  Args:
    vocab_sizes: list of ints, the id range of each column.

  Input shape: int (B, len(vocab_sizes)). Output shape: the same, int64.
  """

  def __init__(self, vocab_sizes, **kwargs):
    super().__init__(**kwargs)
    self.vocab_sizes = [check_int(v, "vocab_sizes", 1) for v in vocab_sizes]
    self._offsets = np.concatenate(
        [[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int64)

  def call(self, ids):
    return keras.ops.cast(ids, "int64") + keras.ops.convert_to_tensor(
        self._offsets, dtype="int64")

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "vocab_sizes": list(self.vocab_sizes)}


def criteo_model(num_buckets, num_dense=13, embedding_dim=16,
                 hidden=(256, 128), dropout_rate=0.3, seed=None,
                 name="criteo_model"):
  """Click-through: categorical embeddings + dense features, MLP, sigmoid.

  Args:
    num_buckets: id range of each categorical column: one int for all, or one
      per column (`split.info["num_buckets"]`); the number of columns is
      `len(num_buckets)`, or 26 for one int.
    num_dense: number of dense features.
    embedding_dim: embedding width per categorical column.
    hidden: widths of the hidden Dense layers.
    dropout_rate: rate of the Dropout after each hidden layer (a float or one
      per layer).
    seed: seeds initializers and Dropout; None leaves them unseeded.
    name: model name.

  Returns:
    An uncompiled Functional model. Inputs: {"dense": float32 (B, num_dense),
    "cat": int64 (B, num_columns)} (the `dropvar_tf.study.data.criteo` layout);
    output: click probability, float32 (B, 1), sigmoid.

  Raises:
    ValueError: on an invalid argument.
  """
  if isinstance(num_buckets, (list, tuple, np.ndarray)):
    if not len(num_buckets):
      raise invalid("num_buckets", "an int >= 2 or a non-empty list of them",
                    num_buckets)
    buckets = [check_int(b, "num_buckets", 2) for b in num_buckets]
  else:
    buckets = [check_int(num_buckets, "num_buckets", 2)] * 26
  num_dense = check_int(num_dense, "num_dense", 1)
  embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
  widths = _check_widths(hidden)
  rates = _check_rates(dropout_rate, len(widths))
  seeds = _Seeds(seed)
  dense = keras.Input(shape=(num_dense,), dtype="float32", name="dense")
  cat = keras.Input(shape=(len(buckets),), dtype="int64", name="cat")
  ids = CategoricalOffsets(buckets, name="cat_offsets")(cat)
  emb = keras.layers.Embedding(sum(buckets), embedding_dim,
                               name="cat_embedding",
                               embeddings_initializer=seeds.embedding())(ids)
  emb = keras.layers.Flatten(name="cat_flatten")(emb)
  x = keras.layers.Concatenate(name="concat")([emb, dense])
  x = _mlp(x, widths, rates, seeds)
  out = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME,
                           kernel_initializer=seeds.kernel())(x)
  return keras.Model({"dense": dense, "cat": cat}, out, name=name)


def _check_shape(input_shape):
  try:
    shape = tuple(check_int(d, "input_shape", 1) for d in input_shape)
  except (TypeError, ValueError):
    raise invalid("input_shape", "a tuple of positive ints",
                  input_shape) from None
  if not shape:
    raise invalid("input_shape", "a tuple of positive ints", input_shape)
  return shape


def image_mlp(input_shape, num_classes, hidden=(256, 256), dropout_rate=0.3,
              seed=None, name="image_mlp"):
  """Image classification MLP: flatten, hidden layers with Dropout, softmax.

  Args:
    input_shape: one image's shape, e.g. (8, 8, 1) or (64,).
    num_classes: number of classes, >= 2.
    hidden: widths of the hidden Dense layers.
    dropout_rate: rate of the Dropout after each hidden layer (a float or one
      per layer).
    seed: seeds initializers and Dropout; None leaves them unseeded.
    name: model name.

  Returns:
    An uncompiled Functional model: float32 (B, *input_shape) ->
    class probabilities (B, num_classes).
  """
  shape = _check_shape(input_shape)
  num_classes = check_int(num_classes, "num_classes", 2)
  widths = _check_widths(hidden)
  rates = _check_rates(dropout_rate, len(widths))
  seeds = _Seeds(seed)
  inputs = keras.Input(shape=shape, name="image")
  x = keras.layers.Flatten(name="flatten")(inputs)
  x = _mlp(x, widths, rates, seeds)
  out = keras.layers.Dense(num_classes, activation="softmax", name=OUTPUT_NAME,
                           kernel_initializer=seeds.kernel())(x)
  return keras.Model(inputs, out, name=name)


def image_cnn(input_shape, num_classes, filters=(32, 64), dense=128,
              dropout_rate=0.3, seed=None, name="image_cnn"):
  """Image classification CNN: conv/pool blocks, a hidden layer, softmax.

  Each block is a 3x3 ReLU convolution "conv_i" (same padding) and, while the
  feature map is at least 2x2, a 2x2 max pool "pool_i". Then flatten, the
  hidden Dense "hidden_0" with Dropout "dropout_0", and the softmax output.

  Args:
    input_shape: (H, W, C) of one image, e.g. (8, 8, 1) or (28, 28, 1).
    num_classes: number of classes, >= 2.
    filters: channels of each convolution.
    dense: width of the hidden Dense layer.
    dropout_rate: rate of the Dropout after the hidden layer.
    seed: seeds initializers and Dropout; None leaves them unseeded.
    name: model name.

  Returns:
    An uncompiled Functional model: float32 (B, H, W, C) ->
    class probabilities (B, num_classes).
  """
  shape = _check_shape(input_shape)
  if len(shape) != 3:
    raise invalid("input_shape", "(height, width, channels)", input_shape)
  num_classes = check_int(num_classes, "num_classes", 2)
  channels = _check_widths(filters, "filters")
  widths = _check_widths(dense, "dense")
  rates = _check_rates(dropout_rate, len(widths))
  seeds = _Seeds(seed)
  inputs = keras.Input(shape=shape, name="image")
  x = inputs
  height, width = shape[:2]
  for i, c in enumerate(channels):
    x = keras.layers.Conv2D(c, 3, padding="same", activation="relu",
                            name=f"conv_{i}",
                            kernel_initializer=seeds.kernel())(x)
    if height >= 2 and width >= 2:
      x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
      height, width = height // 2, width // 2
  x = keras.layers.Flatten(name="flatten")(x)
  x = _mlp(x, widths, rates, seeds)
  out = keras.layers.Dense(num_classes, activation="softmax", name=OUTPUT_NAME,
                           kernel_initializer=seeds.kernel())(x)
  return keras.Model(inputs, out, name=name)


def compile_for_task(model, kind, learning_rate=1e-3):
  """Compiles `model` in place with the loss and metrics of a task kind.

  - "regression": mean squared error; metrics RMSE and MAE.
  - "binary": binary cross-entropy on a sigmoid output; metrics AUC,
    accuracy.
  - "multiclass": sparse categorical cross-entropy on a softmax output;
    metric accuracy.

  Args:
    model: a Keras model.
    kind: one of `dropvar_tf.study.data.TASK_KINDS`.
    learning_rate: Adam learning rate.

  Returns:
    `model`, compiled (any previous compile state is replaced).
  """
  if not isinstance(model, keras.Model):
    raise invalid("model", "a `keras.Model`", type(model).__name__)
  common.check_kind(kind)
  if isinstance(learning_rate, bool) or not isinstance(
      learning_rate, (int, float)) or learning_rate <= 0:
    raise invalid("learning_rate", "a float > 0", learning_rate)
  if kind == common.REGRESSION:
    loss = "mean_squared_error"
    metrics = [keras.metrics.RootMeanSquaredError(name="rmse"),
               keras.metrics.MeanAbsoluteError(name="mae")]
  elif kind == common.BINARY:
    loss = "binary_crossentropy"
    metrics = [keras.metrics.AUC(name="auc"),
               keras.metrics.BinaryAccuracy(name="accuracy")]
  else:
    loss = "sparse_categorical_crossentropy"
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
  model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                metrics=metrics)
  return model


def train_base_model(model, split, epochs=5, batch_size=256, seed=0,
                     learning_rate=1e-3, validate=True, verbose=0):
  """Compiles `model` for `split.info["kind"]` and fits it on the train part.

  Side effects: calls `keras.utils.set_random_seed(seed)` (Python, numpy and
  backend global seeds) so that the shuffling of the fit is reproducible;
  recompiles `model`; changes its weights.

  Args:
    model: a model whose inputs match `split.x_train`.
    split: a `dropvar_tf.study.data.Split`.
    epochs: training epochs, >= 1.
    batch_size: batch size, >= 1.
    seed: global seed set before fitting.
    learning_rate: Adam learning rate.
    validate: evaluate on the test part after each epoch.
    verbose: Keras fit verbosity.

  Returns:
    The Keras `History` of the fit.
  """
  if not isinstance(split, common.Split):
    raise invalid("split", "a `dropvar_tf.study.data.Split`",
                  type(split).__name__)
  epochs = check_int(epochs, "epochs", 1)
  batch_size = check_int(batch_size, "batch_size", 1)
  keras.utils.set_random_seed(check_int(seed, "seed", 0))
  compile_for_task(model, split.info.get("kind"), learning_rate)
  return model.fit(
      split.x_train, split.y_train, epochs=epochs, batch_size=batch_size,
      validation_data=(split.x_test, split.y_test) if validate else None,
      verbose=verbose)
