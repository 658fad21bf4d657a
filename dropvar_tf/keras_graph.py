"""Keras graph introspection: the one module that reads Keras and TF internals.

Tapping a trained model, re-running its graph with other layers and checking
an exported graph need what Keras and TensorFlow keep private: the history of
a symbolic tensor (`_keras_history`), the nodes of a layer
(`_inbound_nodes`), a Functional model's graph walk (`_run_through_graph`),
a layer's variable lists, TF's XLA-context flag and its op registry. Every
such use is here, behind a public function, so that a Keras or TensorFlow
upgrade that moves one of them breaks one module, and the rest of the package
uses only public names.

Functions that take a model expect a built Functional or Sequential
`keras.Model` (see `validation.check_model`).
"""

# This module is where the private uses live (see above).

from tensorflow.core.protobuf import config_pb2
from tensorflow.python.framework import op_def_registry

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf

try:
  from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover - depends on the Keras layout.
  _Functional = None

try:
  from keras.src.layers.preprocessing.data_layer import DataLayer as _DataLayer
except ImportError:  # pragma: no cover - depends on the Keras layout.
  _DataLayer = None

try:
  from keras.src.layers.rnn.dropout_rnn_cell import (
      DropoutRNNCell as _DropoutRNNCell)
except ImportError:  # pragma: no cover - depends on the Keras layout.
  _DropoutRNNCell = None

try:
  from keras.src.layers.rnn.conv_lstm import ConvLSTMCell as _ConvLSTMCell
except ImportError:  # pragma: no cover - depends on the Keras layout.
  _ConvLSTMCell = None

try:  # Tells whether a graph is being built for XLA (no public API).
  from tensorflow.python.ops import control_flow_util as _control_flow_util
except ImportError:  # pragma: no cover - moved in another TF version
  _control_flow_util = None


# ---------------------------------------------------------------------------
# Models and their layers.


def is_graph_model(model):
  """True for Functional and Sequential Keras models (they have a graph)."""
  if isinstance(model, keras.Sequential):
    return True
  if _Functional is not None:
    return isinstance(model, _Functional)
  return hasattr(model, "_run_through_graph")  # pragma: no cover


def model_input(model):
  """Returns `model`'s symbolic input structure (Sequential models included).

  A Sequential model never called on a tensor has no `input` attribute; its
  graph input is `model.inputs[0]`.
  """
  if isinstance(model, keras.Sequential):
    return model.inputs[0]
  return model.input


def iter_layers(model):
  """Yields every layer of `model`, descending into nested models."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from iter_layers(layer)
    else:
      yield layer


def dropout_layers(model):
  """Returns the Dropout layers (and subclasses) of `model`, nested included."""
  return [l for l in iter_layers(model) if isinstance(l, keras.layers.Dropout)]


def sublayers(layer):
  """Returns the layers `layer` holds directly, in the order it set them.

  For a model these are `model.layers`; for any other layer, the layers it
  tracks as attributes (a custom layer's blocks, an RNN's cell, a
  Bidirectional's two RNNs, MultiHeadAttention's inner Dropout).
  """
  if isinstance(layer, keras.Model):
    return list(layer.layers)
  return list(getattr(layer, "_layers", ()))


def all_layers(model):
  """Every layer under `model`, each once, depth first (`model` excluded).

  That is nested models' layers and the layers custom layers hold
  (`sublayers`).
  """
  seen, order = set(), []

  def visit(layer):
    for child in sublayers(layer):
      if id(child) not in seen:
        seen.add(id(child))
        order.append(child)
        visit(child)

  visit(model)
  return order


def owns_seed_generator(layer):
  """True when `layer` itself holds a `keras.random.SeedGenerator`.

  Keras layers that draw random numbers in their call (dropout, noise,
  augmentation) hold one; sublayers' generators are not counted.
  """
  return bool(getattr(layer, "_seed_generators", ()))


def is_dropout_rnn_cell(cell):
  """True for RNN cells with Keras' `dropout`/`recurrent_dropout` masks.

  Those cells (SimpleRNN, LSTM, GRU and ConvLSTM cells) draw their masks with
  `get_dropout_mask` and `get_recurrent_dropout_mask`, once per sequence.
  """
  if _DropoutRNNCell is None:  # pragma: no cover
    return hasattr(cell, "get_recurrent_dropout_mask")
  return isinstance(cell, _DropoutRNNCell)


def rnn_mask_count(cell):
  """How many dropout masks `cell` indexes per step (one per gate), or None.

  LSTM and GRU cells with `implementation=1` (Keras sets it whenever
  `recurrent_dropout` is on) and ConvLSTM cells index their masks as
  `mask[gate]`, meaning one independent mask per gate; other cells multiply
  by a single mask. Keras 3 draws a single (batch, ...) mask there, so that
  `mask[gate]` takes the mask of batch row `gate` for every example: each
  example still gets independent per-gate masks, which is the distribution
  reproduced here with a (gates, batch, ...) mask.
  """
  if _ConvLSTMCell is not None and isinstance(cell, _ConvLSTMCell):
    return 4
  if getattr(cell, "implementation", None) == 1:
    if isinstance(cell, keras.layers.LSTMCell):
      return 4
    if isinstance(cell, keras.layers.GRUCell):
      return 3
  return None


def is_data_layer(layer):
  """True for Keras preprocessing/augmentation layers (RandomFlip, ...).

  Their randomness is augmentation, active only with `training=True`.
  """
  return _DataLayer is not None and isinstance(layer, _DataLayer)


# ---------------------------------------------------------------------------
# The symbolic graph.


def source_layer(tensor):
  """Returns the layer (or nested model) whose call produced `tensor`.

  Args:
    tensor: a symbolic `KerasTensor` of a Functional graph.
  """
  return tensor._keras_history.operation


def called_on_tensor_alone(tensor):
  """Whether the call that produced `tensor` passed one argument, no option.

  The one positional argument may be a tensor or a list of them (a merge:
  `graph_nodes` tells how many). `training=False` (or None), which
  Sequential models record, counts as no option: it is what an inference
  call passes anyway.

  Args:
    tensor: a symbolic `KerasTensor` of a Functional graph.
  """
  history = tensor._keras_history
  node = history.operation._inbound_nodes[history.node_index]
  arguments = node.arguments
  kwargs = dict(arguments.kwargs)
  training = kwargs.pop("training", None)
  return (len(arguments.args) == 1 and not kwargs and
          (training is None or training is False))


def graph_nodes(model):
  """Maps id(layer) -> list of (input_tensors, output_tensors) in `model`.

  Walks back from the model's outputs, so calls of the same layer objects in
  other graphs (e.g. clones that reuse them) are not counted. A layer called
  n times in `model` has n entries; a nested model counts as one layer.

  Args:
    model: a built Functional or Sequential model.

  Returns:
    A dict keyed by `id(layer)`; each value lists that layer's calls as
    `(list of input KerasTensors, list of output KerasTensors)`.
  """
  nodes, seen, stack = {}, set(), list(model.outputs)
  while stack:
    tensor = stack.pop()
    history = tensor._keras_history
    key = (id(history.operation), history.node_index)
    if key in seen:
      continue
    seen.add(key)
    node = history.operation._inbound_nodes[history.node_index]
    nodes.setdefault(id(history.operation), []).append(
        (list(node.input_tensors), list(node.output_tensors)))
    stack.extend(node.input_tensors)
  return nodes


def _build_input_shapes(model):
  """The input shape structure a subclassed `model` was built with, or None."""
  shapes = getattr(model, "_build_shapes_dict", None)
  if not shapes or len(shapes) != 1:
    return None
  return next(iter(shapes.values()))


def _symbolic_inputs(shapes, name):
  """`keras.Input`s of the shape structure `shapes` (batch dimension free)."""
  if isinstance(shapes, dict):
    return {k: _symbolic_inputs(v, k) for k, v in shapes.items()}
  if isinstance(shapes, (list, tuple)) and shapes and not isinstance(
      shapes[0], (int, type(None))):
    return [_symbolic_inputs(v, f"{name}_{i}") for i, v in enumerate(shapes)]
  return keras.Input(tuple(shapes)[1:], name=name)


def _unroll_call(layer, paths, path, args, kwargs):
  """Calls a subclassed `layer`'s `call` on symbolic tensors, recording paths.

  Going past `Layer.__call__` makes each of its sublayers' calls a node of
  the graph under construction, sharing the same layer objects.
  """
  for child in layer.layers:
    paths.setdefault(id(child), f"{path}/{child.name}" if path else
                     child.name)
  kwargs = {k: v for k, v in kwargs.items() if k != "training"}
  return layer.call(*args, **kwargs)


def functional_view(model):
  """A Functional model computing what `model` computes, with its layers.

  Sequential models, and Functional models without subclassed models
  inside, are returned as they are (a subclassed model inside a Sequential
  one stays one node). A subclassed model (bare, or as a node of a
  Functional model) is replaced by its `call` run on symbolic inputs, so
  that the layers it calls become nodes of the new graph: the same layer
  objects (weights shared, nothing copied or changed), reachable by name.
  Sublayers that are subclassed models themselves stay one node.

  Args:
    model: a built `keras.Model`.

  Returns:
    `(view, paths)`: the Functional model, and a dict mapping `id(layer)` to
    the layer's path in `model` (`"<submodel>/<layer>"`) for each layer that
    came from inside a subclassed model (empty when `view` is `model`).

  Raises:
    TypeError, ValueError, NotImplementedError: Keras cannot run `call`
      symbolically (it uses raw TensorFlow ops or Python control flow on
      tensor values), or a built subclassed model has no recorded input
      shape.
  """
  paths = {}
  if is_graph_model(model):
    if isinstance(model, keras.Sequential) or not any(
        isinstance(l, keras.Model) and not is_graph_model(l)
        for l in model.layers):
      return model, paths
    inputs = tf.nest.map_structure(
        lambda t: keras.Input(t.shape[1:], dtype=t.dtype,
                              name=t._keras_history.operation.name),
        model.input)

    def call_fn(layer, *args, **kwargs):
      if isinstance(layer, keras.Model) and not is_graph_model(layer):
        return _unroll_call(layer, paths, layer.name, args, kwargs)
      return layer(*args, **kwargs)

    outputs = model._run_through_graph(tf.nest.flatten(inputs),
                                       call_fn=call_fn)
    return keras.Model(inputs, outputs, name=model.name), paths
  shapes = _build_input_shapes(model)
  if shapes is None:
    raise ValueError(f"subclassed model {model.name!r} has no recorded "
                     "input shape (build it by calling it on a batch)")
  inputs = _symbolic_inputs(shapes, "inputs")
  outputs = _unroll_call(model, paths, "", (inputs,), {})
  return keras.Model(inputs, outputs, name=model.name), paths


def as_functional(model):
  """`model` itself, or a subclassed `model` as the one node of a Functional.

  The wrapper gives a subclassed model what a Functional model has (inputs,
  outputs, their shapes and dtypes) without looking inside its `call`; it
  computes exactly what `model` computes.

  Raises:
    ValueError: a subclassed `model` has no recorded input shape.
  """
  if is_graph_model(model):
    return model
  shapes = _build_input_shapes(model)
  if shapes is None:
    raise ValueError(f"subclassed model {model.name!r} has no recorded "
                     "input shape (build it by calling it on a batch)")
  inputs = _symbolic_inputs(shapes, "inputs")
  return keras.Model(inputs, model(inputs), name=model.name)


def output_structure(model):
  """`model`'s symbolic output structure (Sequential and subclassed too).

  Raises:
    ValueError: a subclassed `model` has no recorded input shape.
  """
  if isinstance(model, keras.Sequential):
    return model.outputs[0]
  return as_functional(model).output


def output_names(model):
  """The names of `model`'s outputs, or None when it has one output tensor.

  The keys of a dict output (sorted); for a list output, the Keras output
  names of a Functional model, "output_<i>" for a subclassed model (its
  outputs have no names of their own). See `contract.OUTPUT_SEPARATOR`.

  Raises:
    ValueError: nested output structures, or a subclassed `model` without
      a recorded input shape.
  """
  structure = output_structure(model)
  flat = tf.nest.flatten(structure)
  if len(flat) == 1:
    return None
  if isinstance(structure, dict):
    if len(structure) != len(flat):
      raise ValueError(f"model {model.name!r} has nested outputs")
    return sorted(structure)
  if len(structure) != len(flat):
    raise ValueError(f"model {model.name!r} has nested outputs")
  names = [f"output_{i}" for i in range(len(flat))]
  if is_graph_model(model):
    keras_names = [t._keras_history.operation.name for t in flat]
    if len(set(keras_names)) == len(flat):
      names = keras_names
  return names


def select_outputs(structure, names):
  """The tensors of an output `structure` in the order of `names`.

  Args:
    structure: what a model with `output_names(model) == names` returns
      (a dict keyed by the names, or a list in output order), or its
      symbolic output.
    names: `output_names(model)`; None for one output tensor.

  Returns:
    A list of tensors, one per name (one in all when `names` is None).
  """
  if names is None:
    return tf.nest.flatten(structure)[:1]
  if isinstance(structure, dict):
    return [structure[n] for n in names]
  return list(structure)


def output_is_probabilities(model, output=None):
  """False when `model`'s output layer visibly is not a softmax.

  A Dense/Conv/Activation output with another activation (linear, sigmoid)
  gives False; a softmax, a `Softmax` layer, or a layer whose activation
  cannot be seen (a nested model) gives True.

  Args:
    model: a Functional or Sequential model.
    output: one of its symbolic output tensors (default: the first).
  """
  layer = source_layer(model.outputs[0] if output is None else output)
  if isinstance(layer, keras.layers.Softmax):
    return True
  activation = getattr(layer, "activation", None)
  if activation is None:
    return True
  return getattr(activation, "__name__", None) == "softmax"


def run_through_graph(model, inputs, call_fn):
  """Re-runs a Functional model's graph with `call_fn` in place of its layers.

  Args:
    model: a Functional model (not Sequential).
    inputs: a flat list of values, one per model input, in `model.inputs`
      order.
    call_fn: called as `call_fn(layer, *args, **kwargs)` for each graph node
      in topological order, with the node's arguments mapped to the values
      computed so far; returns the node's outputs.

  Returns:
    The values of the model's outputs, in its output structure.
  """
  return model._run_through_graph(inputs, call_fn=call_fn)


# ---------------------------------------------------------------------------
# Layer state that Keras tracks.


def set_untracked_attribute(layer, name, value):
  """Sets `layer.<name> = value` without Keras' attribute tracking.

  Tracking would collect the variables in `value` as the layer's own, and
  flip their `trainable` flags to the layer's; use this to hold variables
  owned by another layer, or containers of them.
  """
  object.__setattr__(layer, name, value)


def add_shared_weight(layer, variable):
  """Lists `variable`, owned by another layer, in `layer.non_trainable_weights`.

  The variable itself is not changed (its `trainable` flag included): the
  layer only reports it, so that saving `layer` writes its value and
  `load_own_variables` restores it.
  """
  layer._non_trainable_variables.append(variable)


# ---------------------------------------------------------------------------
# TensorFlow.


def in_xla_context():
  """True while tracing a graph that XLA compiles.

  That is `tf.function(jit_compile=True)`, and Keras' default on GPUs. True
  too when this TensorFlow cannot tell, so that callers choose the ops that
  run everywhere.
  """
  if _control_flow_util is None:
    return True
  return _control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


def is_registered_op(op_type):
  """True when the op type `op_type` is registered in this TensorFlow."""
  return op_def_registry.get(op_type) is not None


def session_callable(session, feeds, fetches, targets=()):
  """A callable running `fetches` in a TF1 `Session` from `feeds`.

  `Session.make_callable` with a feed list falls back to `Session.run`,
  which rebuilds its feed and fetch handling on every call; the callable
  TF's C API makes from `CallableOptions` (as Keras' TF1 backend used it)
  does that once.

  Args:
    session: a `tf.compat.v1.Session`.
    feeds: tensor names to feed, e.g. "serving_default_x:0".
    fetches: tensor names to fetch.
    targets: operation names to run without fetching anything.

  Returns:
    A function of one numpy array per feed, each already of its tensor's
    dtype, returning the list of fetched numpy arrays.
  """
  options = config_pb2.CallableOptions()
  options.feed.extend(feeds)
  options.fetch.extend(fetches)
  options.target.extend(targets)
  return session._make_callable_from_options(options)
