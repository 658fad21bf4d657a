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
- `subclassed` (a bare subclassed model), `no_dropout`, `unbuilt`.
- `multi_output(kind)`: two outputs, "value" and "klass", as a dict, a list
  or a subclassed model's list.

`sample_inputs(kind, n, seed)` gives matching inputs for each kind.

Models with one kind of dropout source each, one linear output unit
(`SOURCE_BUILDERS`, inputs from `source_inputs(kind, n)`): "dropout",
"spatial_dropout", "transformer" (MultiHeadAttention dropout and a Dropout in
a custom block, in a nested model), "lstm", "lstm_input_dropout" (no
recurrent dropout: one mask for all gates), "gru", "simple_rnn",
"bidirectional", "conv_lstm" (RNN `dropout` and `recurrent_dropout`),
"gaussian", "alpha", "custom_layer" (a Dropout inside a custom layer),
"wrapped_subclassed" (a subclassed model inside a Functional one),
"registered" (`NoisyMask`, a dropout-like layer Keras does not know; call
`register_noisy_mask()` first) and "batch_norm" (Dropout after a
BatchNormalization with non-trivial statistics).

MC-target test models (`target_model(kind, rate, seed)`, shared by the tests
of `targets`, `seeded_dropout` and `metrics`):
- "regression", "binary", "softmax": 6 features -> 16 relu -> Dropout ->
  8 relu -> Dropout -> 1 linear, 1 sigmoid or 3 softmax units.
- "bn": "regression" with BatchNormalization before the first Dropout.
- "sequential": Sequential, 6 -> 16 relu -> Dropout -> 1.
- "nested": a Sequential block with a Dropout inside a Functional model.
- "dict": int64 `user_id`/`movie_id` inputs into Embedding layers.
- "conv": 6x6x2 images, Conv2D -> SpatialDropout2D -> Flatten -> Dropout.
- "identity": one Dropout on a 4-feature input (samples are x * keep / (1 -
  rate), so the DPV is known in closed form).

`target_features(n)` gives inputs of the 6-feature models,
`target_dict_features(n)` those of "dict".

Dual-output models of the serving contract (`dual_dense_model`,
`dual_ratings_model`; inputs and exports in `serving_testing`).
"""

import warnings

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import targets
from dropvar_tf import training
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


# ---------------------------------------------------------------------------
# One model per kind of dropout source.

SEQ_LEN = 5
SEQ_FEATURES = 3


class DenseDropBlock(keras.layers.Layer):
  """A custom layer whose Dropout is a sublayer (not in the model graph)."""

  def __init__(self, units=12, rate=0.3, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(units, activation="tanh", name="dense")
    self.drop = keras.layers.Dropout(rate, name="dropout")

  def call(self, inputs, training=None):
    return self.drop(self.dense(inputs), training=training)


class AttentionBlock(keras.layers.Layer):
  """Transformer block: MultiHeadAttention(dropout) and a Dropout inside."""

  def __init__(self, rate=0.2, **kwargs):
    super().__init__(**kwargs)
    self.attention = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=4, dropout=rate, name="attention")
    self.drop = keras.layers.Dropout(rate, name="drop")
    self.dense = keras.layers.Dense(8, activation="relu", name="ffn")

  def call(self, inputs, training=None):
    h = inputs + self.attention(inputs, inputs, training=training)
    return h + self.drop(self.dense(h), training=training)


class SubclassedRegressor(keras.Model):
  """A subclassed model with two Dropout layers."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense_a = keras.layers.Dense(16, activation="relu", name="dense_a")
    self.drop_a = keras.layers.Dropout(0.3, name="drop_a")
    self.dense_b = keras.layers.Dense(8, activation="tanh", name="dense_b")
    self.drop_b = keras.layers.Dropout(0.3, name="drop_b")
    self.out = keras.layers.Dense(1, name="value")

  def call(self, inputs, training=None):
    h = self.drop_a(self.dense_a(inputs), training=training)
    return self.out(self.drop_b(self.dense_b(h), training=training))


class NoisyMask(keras.layers.Layer):
  """A dropout-like layer Keras does not know: inverted dropout of `rate`."""

  def __init__(self, rate=0.3, seed=None, **kwargs):
    super().__init__(**kwargs)
    self.rate = rate
    self.seed_generator = keras.random.SeedGenerator(seed)

  def call(self, inputs, training=None):
    if not training:
      return inputs
    return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)


def noisy_mask_noise(layer, inputs, uniform):
  """The registered noise function of `NoisyMask` (same distribution)."""
  keep = keras.ops.cast(uniform >= layer.rate, inputs.dtype)
  return inputs * keep / (1.0 - layer.rate)


def _dense_body(inputs, noise_layer, activation="relu"):
  h = keras.layers.Dense(16, activation=activation, name="dense_a")(inputs)
  h = noise_layer(h)
  h = keras.layers.Dense(8, activation="tanh", name="dense_b")(h)
  return keras.layers.Dense(1, name="value")(h)


def _rnn_model(kind, rnn):
  inputs = keras.Input((SEQ_LEN, SEQ_FEATURES), name="sequence")
  h = rnn(inputs)
  h = keras.layers.Dense(8, activation="tanh", name="dense")(h)
  return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                     name=kind)


def source_model(kind, seed=0, rate=0.3):
  """The model of `kind` (a key of `SOURCE_KINDS`), seeded weights."""
  keras.utils.set_random_seed(seed)
  rnn_args = {"dropout": rate, "recurrent_dropout": rate}
  if kind in ("dropout", "gaussian", "alpha", "custom_layer", "registered"):
    inputs = keras.Input((NUM_FEATURES,), name="features")
    layer = {"dropout": lambda: keras.layers.Dropout(rate, name="drop"),
             "gaussian": lambda: keras.layers.GaussianDropout(
                 rate, name="gdrop"),
             "alpha": lambda: keras.layers.AlphaDropout(rate, name="adrop"),
             "custom_layer": lambda: DenseDropBlock(16, rate, name="block"),
             "registered": lambda: NoisyMask(rate, seed=1, name="noisy")}[
                 kind]()
    # AlphaDropout is meant for SELU networks (dropped units take SELU's
    # negative saturation value).
    activation = "selu" if kind == "alpha" else "relu"
    return keras.Model(inputs, _dense_body(inputs, layer, activation),
                       name=kind)
  if kind == "spatial_dropout":
    inputs = keras.Input((SEQ_LEN, SEQ_FEATURES), name="sequence")
    h = keras.layers.Conv1D(6, 2, activation="relu", name="conv")(inputs)
    h = keras.layers.SpatialDropout1D(rate, name="sdrop")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(8, activation="tanh", name="dense")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                       name=kind)
  if kind == "transformer":
    inner = keras.Input((SEQ_LEN, 8))
    encoder = keras.Model(inner, AttentionBlock(rate, name="block_1")(inner),
                          name="encoder")
    inputs = keras.Input((SEQ_LEN, SEQ_FEATURES), name="sequence")
    h = keras.layers.Dense(8, name="embed")(inputs)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(encoder(h))
    h = keras.layers.Dropout(0.1, name="top_drop")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                       name=kind)
  if kind == "lstm":
    return _rnn_model(kind, keras.layers.LSTM(8, name="lstm", **rnn_args))
  if kind == "lstm_input_dropout":  # One mask for all gates (cuDNN-able).
    return _rnn_model(kind, keras.layers.LSTM(8, dropout=rate, name="lstm"))
  if kind == "gru":
    return _rnn_model(kind, keras.layers.GRU(8, name="gru", **rnn_args))
  if kind == "simple_rnn":
    return _rnn_model(kind, keras.layers.SimpleRNN(8, name="rnn",
                                                   **rnn_args))
  if kind == "bidirectional":
    return _rnn_model(kind, keras.layers.Bidirectional(
        keras.layers.LSTM(6, name="lstm", **rnn_args), name="bidir"))
  if kind == "conv_lstm":
    inputs = keras.Input((SEQ_LEN, 4, SEQ_FEATURES), name="sequence")
    h = keras.layers.ConvLSTM1D(4, 2, name="conv_lstm", **rnn_args)(inputs)
    h = keras.layers.Flatten(name="flat")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                       name=kind)
  if kind == "shared_dropout":  # One Dropout layer on two branches.
    inputs = keras.Input((NUM_FEATURES,), name="features")
    drop = keras.layers.Dropout(rate, name="drop")
    a = keras.layers.Dense(16, activation="relu", name="dense_a")(inputs)
    b = keras.layers.Dense(16, activation="relu", name="dense_b")(inputs)
    h = keras.layers.Add(name="add")([drop(a), drop(b)])
    h = keras.layers.Dense(8, activation="tanh", name="dense")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                       name=kind)
  if kind == "shared_rnn":  # One LSTM run on two sequences (siamese).
    inputs = keras.Input((SEQ_LEN, SEQ_FEATURES), name="sequence")
    lstm = keras.layers.LSTM(8, name="lstm", **rnn_args)
    other = keras.layers.Dense(SEQ_FEATURES, name="project")(inputs)
    h = keras.layers.Concatenate(name="both")([lstm(inputs), lstm(other)])
    h = keras.layers.Dense(8, activation="tanh", name="dense")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(h),
                       name=kind)
  if kind == "wrapped_subclassed":
    inner = SubclassedRegressor(name="inner")
    inputs = keras.Input((NUM_FEATURES,), name="features")
    return keras.Model(inputs, inner(inputs), name=kind)
  if kind == "batch_norm":
    return binary_bn(seed, rate)
  raise KeyError(kind)


SOURCE_KINDS = ("dropout", "spatial_dropout", "transformer", "lstm",
                "lstm_input_dropout", "gru", "simple_rnn", "bidirectional",
                "conv_lstm", "gaussian", "alpha", "custom_layer",
                "wrapped_subclassed", "registered", "batch_norm",
                "shared_dropout", "shared_rnn")


def source_inputs(kind, n, seed=0):
  """`n` seeded inputs for `source_model(kind)`.

  Each example is scaled by its own factor in [0.2, 3], so that the examples'
  DPVs spread widely and rank comparisons are not all noise.
  """
  rng = np.random.default_rng(seed)
  if kind in ("spatial_dropout", "transformer", "lstm", "lstm_input_dropout",
              "gru", "simple_rnn", "bidirectional", "shared_rnn"):
    shape = (n, SEQ_LEN, SEQ_FEATURES)
  elif kind == "conv_lstm":
    shape = (n, SEQ_LEN, 4, SEQ_FEATURES)
  else:
    shape = (n, NUM_FEATURES)
  scale = rng.uniform(0.2, 3.0, (n,) + (1,) * (len(shape) - 1))
  return (rng.normal(size=shape) * scale).astype("float32")


def subclassed_regressor(seed=0):
  """A built bare subclassed model with two Dropout layers."""
  keras.utils.set_random_seed(seed)
  model = SubclassedRegressor(name="subclassed_regressor")
  model(np.zeros((1, NUM_FEATURES), "float32"))
  return model


class SubclassedTwoOutputs(keras.Model):
  """A subclassed model returning a list: a value and 3 class probabilities."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense_a = keras.layers.Dense(16, activation="relu", name="dense_a")
    self.drop_a = keras.layers.Dropout(0.3, name="drop_a")
    self.dense_b = keras.layers.Dense(8, activation="relu", name="dense_b")
    self.drop_b = keras.layers.Dropout(0.3, name="drop_b")
    self.value = keras.layers.Dense(1, name="value")
    self.klass = keras.layers.Dense(NUM_CLASSES, activation="softmax",
                                    name="klass")

  def call(self, inputs, training=None):
    h = self.drop_a(self.dense_a(inputs), training=training)
    value = self.value(self.drop_b(self.dense_b(h), training=training))
    return [value, self.klass(h)]


def multi_output(kind="dict", seed=0):
  """A two-output model on 6 features: "value" (1 linear unit, after
  Dropout -> Dense) and "klass" (3 softmax units).

  Args:
    kind: "dict" (Functional, dict outputs), "list" (Functional, list
      outputs [value, klass]) or "subclassed" (`SubclassedTwoOutputs`,
      outputs "output_0" and "output_1").
    seed: Keras seed of the weights.
  """
  keras.utils.set_random_seed(seed)
  if kind == "subclassed":
    model = SubclassedTwoOutputs(name="two_outputs")
    model(np.zeros((1, NUM_FEATURES), "float32"))
    return model
  inputs = keras.Input((NUM_FEATURES,), name="features")
  h = keras.layers.Dense(16, activation="relu", name="dense_a")(inputs)
  h = keras.layers.Dropout(0.3, name="drop_a")(h)
  g = keras.layers.Dense(8, activation="relu", name="dense_b")(h)
  g = keras.layers.Dropout(0.3, name="drop_b")(g)
  value = keras.layers.Dense(1, name="value")(g)
  klass = keras.layers.Dense(NUM_CLASSES, activation="softmax",
                             name="klass")(h)
  outputs = {"value": value, "klass": klass} if kind == "dict" else [
      value, klass]
  return keras.Model(inputs, outputs, name=f"two_outputs_{kind}")


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

def target_model(kind, rate=0.3, seed=0):
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


def target_features(n=12, seed=0):
  return np.random.RandomState(seed).randn(n, 6).astype(np.float32)


def target_dict_features(n=12, seed=0):
  rng = np.random.RandomState(seed)
  return {"user_id": rng.randint(0, 20, n).astype(np.int64),
          "movie_id": rng.randint(0, 30, n).astype(np.int64)}


# Dual-output models of the serving contract, with no variation head to fit
# (serving tests check the server and client on their own). Feature sizes
# kept tiny so tests stay fast.
DUAL_DENSE_FEATURES = 4
DUAL_NUM_USERS = 50
DUAL_NUM_MOVIES = 40
DUAL_CONTEXT_FEATURES = 2


def dual_dense_model(seed=0):
  """A Functional model with one float input `x` of shape (batch, 4).

  Args:
    seed: seed of the weight initialisers.

  Returns:
    A `keras.Model` whose outputs are a dict: "prediction" (batch, 1) and
    "variation" (batch, 1), the latter >= 0.
  """
  init = keras.initializers.GlorotUniform(seed=seed)
  x = keras.Input(shape=(DUAL_DENSE_FEATURES,), dtype="float32", name="x")
  h = keras.layers.Dense(8, activation="relu", kernel_initializer=init)(x)
  h = keras.layers.Dropout(0.2, seed=seed)(h)
  prediction = keras.layers.Dense(1, kernel_initializer=init,
                                  name="pred")(h)
  variation = keras.layers.Dense(1, activation="softplus",
                                 kernel_initializer=init, name="var")(h)
  return keras.Model(x, {contract.PREDICTION_KEY: prediction,
                         contract.VARIATION_KEY: variation})


def dual_ratings_model(seed=0):
  """A model with named int64 inputs `user_id`, `movie_id` and float `context`.

  Args:
    seed: seed of the weight initialisers.

  Returns:
    A `keras.Model` taking a dict {"user_id": (batch,) int64,
    "movie_id": (batch,) int64, "context": (batch, 2) float32} and returning
    {"prediction": (batch, 1), "variation": (batch, 1)}.
  """
  init = keras.initializers.GlorotUniform(seed=seed)
  user = keras.Input(shape=(), dtype="int64", name="user_id")
  movie = keras.Input(shape=(), dtype="int64", name="movie_id")
  context = keras.Input(shape=(DUAL_CONTEXT_FEATURES,), dtype="float32",
                        name="context")
  u = keras.layers.Embedding(DUAL_NUM_USERS, 4,
                             embeddings_initializer=init)(user)
  m = keras.layers.Embedding(DUAL_NUM_MOVIES, 4,
                             embeddings_initializer=init)(movie)
  h = keras.layers.Concatenate()([u, m, context])
  h = keras.layers.Dense(8, activation="relu", kernel_initializer=init)(h)
  h = keras.layers.Dropout(0.2, seed=seed)(h)
  prediction = keras.layers.Dense(1, kernel_initializer=init, name="pred")(h)
  variation = keras.layers.Dense(1, activation="softplus",
                                 kernel_initializer=init, name="var")(h)
  return keras.Model({"user_id": user, "movie_id": movie, "context": context},
                     {contract.PREDICTION_KEY: prediction,
                      contract.VARIATION_KEY: variation})


def fitted_dual(model, x, out_of_range=True):
  """A small dual of `model` (with the signal), fitted on `x` (seeded, fast).

  Targets of 8 samples and 2 epochs: far below the noise bound (its warning
  is silenced), enough for tests of the out-of-range signal's plumbing.
  """
  dual = heads.add_variation_head(model, hidden_units=(8,), seed=0,
                                  out_of_range=out_of_range)
  t = targets.mc_dropout_targets(model, x, num_samples=8, seed=0,
                                 progress=False)
  with warnings.catch_warnings():  # a 2-epoch fit is far below the bound
    warnings.simplefilter("ignore")
    training.fit_variation_head(dual, x, t, epochs=2, num_samples=8, seed=0,
                                report_split=0.2)
  return dual
