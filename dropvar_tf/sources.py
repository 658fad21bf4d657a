"""Dropout sources: every layer whose randomness MC dropout samples.

A Keras model can draw dropout noise in many places: `Dropout` layers and
their subclasses, the attention dropout of `MultiHeadAttention`, the
`dropout`/`recurrent_dropout` masks of RNN cells (also inside
`Bidirectional`), `GaussianDropout` and `AlphaDropout`, at the top level or
deep inside custom layers, nested and subclassed models. `find_sources(model)`
walks the whole layer tree and lists them; `seeded_dropout` makes each one draw
seeded, batching-independent noise during the MC passes.

The walk is depth first over `keras_graph.sublayers` (a model's `layers`,
another layer's tracked sublayers in the order it set them), each layer once.
That order is deterministic for the same code, so a source's position in the
list is a stable index for the mask hash (`mask_hash`); for models whose only
sources are Dropout layers it is their position in
`keras_graph.dropout_layers(model)`, as before sources other than Dropout
were sampled.

Never silently left out: a layer that draws random numbers (it owns a
`keras.random.SeedGenerator`, or is `GaussianNoise`) and is not a known or
registered source raises a `ValueError` naming it. Keras' preprocessing and
augmentation layers (`RandomFlip`, ...) are not dropout and are inactive with
`training=False`, so they are left alone. Custom dropout-like layers are made
known with `register_dropout_source`.

Example:

```python
for source in dropout_sources(model):
  print(source.path, source.kind, source.rate)  # "encoder/attention", ...
```
"""

import collections

from dropvar_tf import keras_graph
from dropvar_tf import validation
from dropvar_tf._keras import keras

DROPOUT = "dropout"
SPATIAL_DROPOUT = "spatial_dropout"
ATTENTION_DROPOUT = "attention_dropout"
RNN_DROPOUT = "rnn_dropout"
RNN_RECURRENT_DROPOUT = "rnn_recurrent_dropout"
GAUSSIAN_DROPOUT = "gaussian_dropout"
ALPHA_DROPOUT = "alpha_dropout"
KINDS = (DROPOUT, SPATIAL_DROPOUT, ATTENTION_DROPOUT, RNN_DROPOUT,
         RNN_RECURRENT_DROPOUT, GAUSSIAN_DROPOUT, ALPHA_DROPOUT)

# What counts as a dropout source, for error messages.
SUPPORTED = (
    "`Dropout` and its subclasses (SpatialDropout1D/2D/3D), the `dropout` of "
    "`MultiHeadAttention`, `dropout` and `recurrent_dropout` of "
    "SimpleRNN/LSTM/GRU/ConvLSTM1D/2D/3D (also inside `Bidirectional`), "
    "`GaussianDropout`, `AlphaDropout`, and layer classes registered with "
    "`dropvar_tf.register_dropout_source`; at any depth (custom layers, "
    "nested and subclassed models)")

_SPATIAL = (keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
            keras.layers.SpatialDropout3D)
# Stochastic in training without owning a SeedGenerator when inactive.
_KNOWN_RANDOM = (keras.layers.GaussianNoise,)
# Classes sampled as Keras' Dropout. Layers that are Dropout in all but
# inheritance add themselves with `add_dropout_class` when their module is
# imported, so no instance can exist before its class is here.
_DROPOUT_CLASSES = [keras.layers.Dropout]


def check_dropout_model(model, arg="model", allow_subclassed=False):
  """Validates a base model whose dropout is to be sampled.

  `validation.check_model`, and at least one dropout source.

  Args:
    model: the value to check.
    arg: the argument name used in error messages.
    allow_subclassed: accept subclassed models too.

  Returns:
    `model`, unchanged.

  Raises:
    ValueError: `validation.check_model` refuses `model`, it has no dropout
      source, or it has a random layer that cannot be reproduced.
  """
  validation.check_model(model, arg=arg, allow_subclassed=allow_subclassed)
  if not find_sources(model):
    raise validation.invalid(
        arg,
        "a model with at least one dropout source (dropout prediction "
        f"variation needs dropout): {SUPPORTED}",
        f"model {model.name!r} without dropout sources")
  return model


def add_dropout_class(layer_class):
  """Makes `find_sources` treat `layer_class` as a Keras `Dropout`.

  For layer classes of this library that behave as Dropout without
  subclassing it (`seeded_dropout.SeededDropout`, e.g. in a saved MC clone).

  Args:
    layer_class: a `keras.layers.Layer` subclass with a `rate` attribute.
  """
  if layer_class not in _DROPOUT_CLASSES:
    _DROPOUT_CLASSES.append(layer_class)

DropoutSource = collections.namedtuple("DropoutSource", ["path", "kind",
                                                          "rate"])
DropoutSource.__doc__ = """One dropout source of a model.

Fields:
  path: the layer's path below the model, names joined by "/", e.g.
    "encoder/block_1/attention".
  kind: one of `KINDS`, or the kind a registered class was given.
  rate: the dropout rate (None when a registered layer has no `rate`).
"""

# A source as the sampler needs it: `layer` is the object whose call (or RNN
# masks) are replaced, `owner` the RNN layer that must run its cell in
# training mode (None for other kinds), `noise_fn` a registered function.
Found = collections.namedtuple(
    "Found", ["path", "kind", "rate", "index", "layer", "owner", "noise_fn"])

_Registered = collections.namedtuple("_Registered",
                                     ["layer_class", "kind", "noise_fn"])
_REGISTRY = []


def register_dropout_source(layer_class, noise_fn, kind="custom"):
  """Makes MC dropout sample the custom dropout-like layer `layer_class`.

  During the MC passes each instance of `layer_class` (subclasses included),
  wherever it sits, is called as
  `noise_fn(layer, inputs, uniform)` instead of its own `call`: `uniform` is
  seeded float32 noise in (0, 1) of the shape of `inputs` (a function of
  seed, example key, sample index, source index and unit, as every mask of
  `mask_hash`), and `noise_fn` returns the layer's training-mode output.
  The registered class takes precedence over the built-in kinds.

  Side effect: changes a process-wide registry; registering a class again
  replaces its entry.

  Args:
    layer_class: a subclass of `keras.layers.Layer` whose `call` takes the
      input tensor first.
    noise_fn: callable `(layer, inputs, uniform) -> outputs`, made of TF/Keras
      ops (it is traced).
    kind: string naming the kind in `dropout_sources` (not a built-in kind).

  Raises:
    ValueError: invalid arguments.

  Example:

  ```python
  class MyDropout(keras.layers.Layer):   # drops with rate `self.rate`
    ...

  dv.register_dropout_source(
      MyDropout,
      lambda layer, x, u: tf.where(u >= layer.rate, x / (1 - layer.rate), 0.))
  ```
  """
  if not isinstance(layer_class, type) or not issubclass(
      layer_class, keras.layers.Layer):
    raise validation.invalid("layer_class", "a subclass of "
                             "`keras.layers.Layer`", layer_class)
  if not callable(noise_fn):
    raise validation.invalid("noise_fn", "a callable (layer, inputs, "
                             "uniform) -> outputs", noise_fn)
  if not isinstance(kind, str) or not kind or kind in KINDS:
    raise validation.invalid("kind", f"a non-empty string other than the "
                             f"built-in kinds {KINDS}", kind)
  unregister_dropout_source(layer_class)
  _REGISTRY.append(_Registered(layer_class, kind, noise_fn))


def unregister_dropout_source(layer_class):
  """Removes `layer_class` from the registry (no-op when absent).

  Side effect: changes the process-wide registry.
  """
  _REGISTRY[:] = [r for r in _REGISTRY if r.layer_class is not layer_class]


def _registered(layer):
  for entry in reversed(_REGISTRY):
    if isinstance(layer, entry.layer_class):
      return entry
  return None


def _rate(layer, name="rate"):
  value = getattr(layer, name, None)
  return None if value is None else float(value)


def _rnn_cells(rnn):
  cell = rnn.cell
  if isinstance(cell, keras.layers.StackedRNNCells):
    return list(cell.cells), True
  return [cell], False


def _refuse(path, layer):
  return validation.invalid(
      "model", "a model whose random layers are all dropout sources that "
      f"can be reproduced: {SUPPORTED}. Register a dropout-like class with "
      "`dropvar_tf.register_dropout_source(layer_class, noise_fn)` (see "
      "docs/dropout_sources.md); other random layers cannot be sampled "
      "reproducibly", f"layer {path!r} of class {type(layer).__name__}, "
      "which draws random numbers in training")


class _Walk:
  """One depth-first walk over a model's layers (see the module docstring)."""

  def __init__(self):
    self.found = []
    self.seen = set()

  def add(self, path, kind, rate, layer, owner=None, noise_fn=None):
    self.found.append(Found(path, kind, rate, len(self.found), layer, owner,
                            noise_fn))

  def visit(self, layer, path, parent):
    if id(layer) in self.seen:
      return
    self.seen.add(id(layer))
    registered = _registered(layer)
    if registered is not None:
      self.add(path, registered.kind, _rate(layer), layer,
               noise_fn=registered.noise_fn)
      return
    if isinstance(layer, tuple(_DROPOUT_CLASSES)):
      if isinstance(parent[1], keras.layers.MultiHeadAttention):
        if layer.rate > 0:
          self.add(parent[0], ATTENTION_DROPOUT, _rate(layer), layer)
        return
      kind = SPATIAL_DROPOUT if isinstance(layer, _SPATIAL) else DROPOUT
      self.add(path, kind, _rate(layer), layer)
      return
    if isinstance(layer, keras.layers.GaussianDropout):
      self.add(path, GAUSSIAN_DROPOUT, _rate(layer), layer)
      return
    if isinstance(layer, keras.layers.AlphaDropout):
      self.add(path, ALPHA_DROPOUT, _rate(layer), layer)
      return
    if keras_graph.is_data_layer(layer):
      return
    if isinstance(layer, keras.layers.RNN):
      self.visit_rnn(layer, path)
    elif keras_graph.owns_seed_generator(layer) or isinstance(
        layer, _KNOWN_RANDOM):
      raise _refuse(path, layer)
    for child in keras_graph.sublayers(layer):
      self.visit(child, f"{path}/{child.name}" if path else child.name,
                 (path, layer))

  def visit_rnn(self, rnn, path):
    cells, stacked = _rnn_cells(rnn)
    for cell in cells:
      if not keras_graph.is_dropout_rnn_cell(cell):
        continue
      self.seen.add(id(cell))
      where = f"{path}/{cell.name}" if stacked else path
      if _rate(cell, "dropout"):
        self.add(where, RNN_DROPOUT, _rate(cell, "dropout"), cell, rnn)
      if _rate(cell, "recurrent_dropout"):
        self.add(where, RNN_RECURRENT_DROPOUT,
                 _rate(cell, "recurrent_dropout"), cell, rnn)
    if stacked:
      self.seen.add(id(rnn.cell))
      for cell in cells:
        if id(cell) not in self.seen:
          self.visit(cell, f"{path}/{cell.name}", (path, rnn))


def find_sources(model):
  """Every dropout source of `model`, with what sampling it needs.

  Args:
    model: a built `keras.Model` (any kind) or layer.

  Returns:
    A list of `Found(path, kind, rate, index, layer, owner, noise_fn)`, in
    walk order; `index` is the position in the list.

  Raises:
    ValueError: a layer draws random numbers that are not a known or
      registered dropout source (the message names its path and class).
  """
  walk = _Walk()
  for child in keras_graph.sublayers(model):
    walk.visit(child, child.name, ("", model))
  return walk.found


def layer_sources(layer):
  """The dropout sources that `layer` is or holds (same records as above).

  Args:
    layer: a Keras layer (a model included).

  Raises:
    ValueError: as `find_sources`.
  """
  walk = _Walk()
  walk.visit(layer, layer.name, ("", None))
  return walk.found


def check_called_sources(model, view, arg="model"):
  """Refuses dropout sources that `model`'s `call` skips with training off.

  A subclassed `call` that branches on `training` (`if training: h =
  self.drop(h)`) never runs its dropout in the deterministic pass, nor in
  an MC pass (which runs with training off and samples the sources in
  place), so neither the head nor the targets could see it.

  Args:
    model: a built `keras.Model`.
    view: its Functional view (`keras_graph.functional_view`), built with
      training off.
    arg: the argument name used in error messages.

  Raises:
    ValueError: a dropout source of `model` is not called in `view` (the
      message names them).
  """
  if view is model:
    return
  called = {id(f.layer) for f in find_sources(view)}
  skipped = [f.path for f in find_sources(model) if id(f.layer) not in called]
  if skipped:
    raise validation.invalid(
        arg, "a model whose `call` runs every dropout layer with training "
        "off too, passing `training` on to it (`self.drop(h, training="
        "training)`) instead of branching on it (`if training:`), which MC "
        "dropout here cannot sample",
        f"model {model.name!r}, whose call with training off skips "
        f"{skipped}")


def dropout_sources(model):
  """Lists what MC dropout samples in `model`: path, kind and rate.

  Args:
    model: a built `keras.Model`: Functional, Sequential or subclassed.

  Returns:
    A list of `DropoutSource(path, kind, rate)` in the order of their mask
    hash index (see the module docstring). Sources with rate 0 are listed
    for Dropout-like layers (they keep their index) and left out for
    attention and RNN dropout (Keras' default of 0 there means none).

  Raises:
    ValueError: `model` is not a Keras model, or has a random layer that
      cannot be reproduced (named, with how to register it).
  """
  if not isinstance(model, keras.Model):
    raise validation.invalid("model", "a `keras.Model`",
                             model if model is None else type(model).__name__)
  return [DropoutSource(f.path, f.kind, f.rate) for f in find_sources(model)]
