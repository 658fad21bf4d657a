"""Tiny seeded Keras models and inputs shared by the core-module tests.

Every builder seeds Keras first, so the same call gives the same weights.
Models are small on purpose (tens of units): the tests check structure and
exact equalities, not accuracy.

Builders (all have Dropout unless the name says otherwise):
- `mlp_softmax`: Sequential, 6 -> 16 relu -> 12 relu -> 3 softmax.
- `binary_bn`: Functional, Dense -> BatchNormalization -> Dropout -> sigmoid;
  its BatchNormalization statistics are set to non-trivial values.
- `regression`: Functional, linear output of one unit.
- `recommender`: Functional, dict inputs `user_id`/`movie_id` (int64) into
  Embedding layers, sigmoid output.
- `cnn`: Functional, 8x8x1 images, Conv2D -> SpatialDropout2D -> pooling.
- `nested`: Functional with a Sequential block inside.
- `subclassed`, `no_dropout`, `unbuilt`: models the library must refuse.

`sample_inputs(kind, n, seed)` gives matching inputs for each kind.
"""

import numpy as np

from dropvar_tf._keras import keras

NUM_FEATURES = 6
NUM_CLASSES = 3
NUM_USERS = 20
NUM_MOVIES = 30
IMAGE_SHAPE = (8, 8, 1)


def mlp_softmax(seed=0, rate=0.3):
  """Sequential multiclass MLP with two Dropout layers."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((NUM_FEATURES,), name="features"),
      keras.layers.Dense(16, activation="relu", name="dense_a"),
      keras.layers.Dropout(rate, name="drop_a"),
      keras.layers.Dense(12, activation="relu", name="dense_b"),
      keras.layers.Dropout(rate, name="drop_b"),
      keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probs"),
  ], name="mlp_softmax")


def binary_bn(seed=0, rate=0.3):
  """Functional binary model with BatchNormalization (moving stats set)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((NUM_FEATURES,), name="features")
  h = keras.layers.Dense(16, name="dense_a")(inputs)
  h = keras.layers.BatchNormalization(name="bn")(h)
  h = keras.layers.Activation("relu", name="relu_a")(h)
  h = keras.layers.Dropout(rate, name="drop_a")(h)
  h = keras.layers.Dense(8, activation="relu", name="dense_b")(h)
  h = keras.layers.Dropout(rate, name="drop_b")(h)
  outputs = keras.layers.Dense(1, activation="sigmoid", name="prob")(h)
  model = keras.Model(inputs, outputs, name="binary_bn")
  # Moving statistics other than (0, 1) so that a layer running in training
  # mode, or a changed statistic, shows up in the outputs.
  rng = np.random.default_rng(seed)
  bn = model.get_layer("bn")
  bn.set_weights([
      rng.uniform(0.5, 1.5, 16).astype("float32"),   # gamma
      rng.normal(0.0, 0.2, 16).astype("float32"),    # beta
      rng.normal(0.0, 0.5, 16).astype("float32"),    # moving_mean
      rng.uniform(0.5, 2.0, 16).astype("float32"),   # moving_variance
  ])
  return model


def regression(seed=0, rate=0.2):
  """Functional regression model with a linear one-unit output."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((NUM_FEATURES,), name="features")
  h = keras.layers.Dense(16, activation="relu", name="dense_a")(inputs)
  h = keras.layers.Dropout(rate, name="drop_a")(h)
  h = keras.layers.Dense(8, activation="tanh", name="dense_b")(h)
  h = keras.layers.Dropout(rate, name="drop_b")(h)
  outputs = keras.layers.Dense(1, name="value")(h)
  return keras.Model(inputs, outputs, name="regression")


def recommender(seed=0, rate=0.3):
  """Functional model on named int64 inputs `user_id` and `movie_id`."""
  keras.utils.set_random_seed(seed)
  user = keras.Input((), dtype="int64", name="user_id")
  movie = keras.Input((), dtype="int64", name="movie_id")
  u = keras.layers.Embedding(NUM_USERS, 4, name="user_emb")(user)
  m = keras.layers.Embedding(NUM_MOVIES, 4, name="movie_emb")(movie)
  h = keras.layers.Concatenate(name="concat")([u, m])
  h = keras.layers.Dense(16, activation="relu", name="dense_a")(h)
  h = keras.layers.Dropout(rate, name="drop_a")(h)
  outputs = keras.layers.Dense(1, activation="sigmoid", name="prob")(h)
  return keras.Model({"user_id": user, "movie_id": movie}, outputs,
                     name="recommender")


def cnn(seed=0, rate=0.3):
  """Functional CNN on 8x8x1 images with spatial and plain dropout."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(IMAGE_SHAPE, name="image")
  h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
  h = keras.layers.SpatialDropout2D(rate, name="sdrop")(h)
  h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
  h = keras.layers.Dense(8, activation="relu", name="dense_a")(h)
  h = keras.layers.Dropout(rate, name="drop_a")(h)
  outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax",
                               name="probs")(h)
  return keras.Model(inputs, outputs, name="cnn")


def nested(seed=0, rate=0.3):
  """Functional model with a Sequential block (holding Dropout) inside."""
  keras.utils.set_random_seed(seed)
  block = keras.Sequential([
      keras.Input((16,)),
      keras.layers.Dense(12, activation="relu", name="inner_dense"),
      keras.layers.Dropout(rate, name="inner_drop"),
  ], name="block")
  inputs = keras.Input((NUM_FEATURES,), name="features")
  h = keras.layers.Dense(16, activation="relu", name="dense_a")(inputs)
  h = block(h)
  outputs = keras.layers.Dense(1, activation="sigmoid", name="prob")(h)
  return keras.Model(inputs, outputs, name="nested")


class _Subclassed(keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(8, activation="relu")
    self.drop = keras.layers.Dropout(0.3)
    self.out = keras.layers.Dense(1)

  def call(self, inputs, training=None):
    return self.out(self.drop(self.dense(inputs), training=training))


def subclassed(seed=0):
  """A built subclassed model (no symbolic graph)."""
  keras.utils.set_random_seed(seed)
  model = _Subclassed(name="subclassed")
  model(np.zeros((1, NUM_FEATURES), "float32"))
  return model


def no_dropout(seed=0):
  """A Functional model without any Dropout layer."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((NUM_FEATURES,), name="features")
  h = keras.layers.Dense(8, activation="relu", name="dense_a")(inputs)
  outputs = keras.layers.Dense(1, name="value")(h)
  return keras.Model(inputs, outputs, name="no_dropout")


def unbuilt():
  """A Sequential model without an Input: no inputs are defined yet."""
  return keras.Sequential([
      keras.layers.Dense(8, activation="relu"),
      keras.layers.Dropout(0.3),
      keras.layers.Dense(1),
  ], name="unbuilt")


BUILDERS = {
    "softmax": mlp_softmax,
    "binary_bn": binary_bn,
    "regression": regression,
    "recommender": recommender,
    "cnn": cnn,
    "nested": nested,
}


def build(kind, seed=0):
  """Builds the test model `kind` (a key of `BUILDERS`)."""
  return BUILDERS[kind](seed=seed)


def sample_inputs(kind, n, seed=0):
  """Returns `n` seeded inputs for the model `kind` (array or dict)."""
  rng = np.random.default_rng(seed)
  if kind == "recommender":
    return {
        "user_id": rng.integers(0, NUM_USERS, n).astype("int64"),
        "movie_id": rng.integers(0, NUM_MOVIES, n).astype("int64"),
    }
  if kind == "cnn":
    return rng.uniform(0.0, 1.0, (n,) + IMAGE_SHAPE).astype("float32")
  return rng.normal(size=(n, NUM_FEATURES)).astype("float32")


def take(x, idx):
  """Rows `idx` of an array or of every array of a dict."""
  if isinstance(x, dict):
    return {k: v[idx] for k, v in x.items()}
  return x[idx]


def weights_snapshot(model):
  """Copies of every variable of `model` (trainable and not), by path."""
  return {v.path: np.array(v.numpy()) for v in model.weights}
