"""Tiny seeded Keras models and inputs of the MC-dropout tests.

Shared by the tests of `targets`, `seeded_dropout` and `metrics`
(`mc_convergence`). `build_model(kind)` seeds Keras first, so one call gives
the same weights every time:

- "regression", "binary", "softmax": 6 features -> 16 relu -> Dropout ->
  8 relu -> Dropout -> 1 linear, 1 sigmoid or 3 softmax units.
- "bn": "regression" with BatchNormalization before the first Dropout.
- "sequential": Sequential, 6 -> 16 relu -> Dropout -> 1.
- "nested": a Sequential block with a Dropout inside a Functional model.
- "dict": int64 `user_id`/`movie_id` inputs into Embedding layers.
- "conv": 6x6x2 images, Conv2D -> SpatialDropout2D -> Flatten -> Dropout.
- "identity": one Dropout on a 4-feature input (samples are x * keep / (1 -
  rate), so the DPV is known in closed form).

`features(n)` gives inputs of the 6-feature models, `dict_features(n)` those
of "dict".
"""

import numpy as np

from dropvar_tf._keras import keras


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
