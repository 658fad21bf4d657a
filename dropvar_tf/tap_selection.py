"""Cost-aware choice of the layers a variation head taps (`layers="auto"`).

Tapping every candidate layer (`heads.candidate_layers`) costs little on an
MLP but not on a big model: EfficientNetB0 has 75 candidates, and each probe
passes over its layer's whole activation on every request. The paper's
finding is that a few layers carry almost all of the signal, so the default
taps a few, chosen by a static cost model:

- The base model's cost per example is estimated from its graph: for each
  layer, `params * positions` multiply-adds (a Dense or Conv kernel applied
  at every spatial or time position; an Embedding only looks up its output),
  plus `READ_COST` per element of its output (elementwise work and memory
  traffic). Nested Functional models are estimated layer by layer.
- A probe's cost is `READ_COST` per element it reads: a "summary" probe
  reads its input `SUMMARY_READS` times; a "neurons" probe averages a
  feature map once (and reads nothing on a rank-2 output), plus the head's
  first layer, `HEAD_WIDTH` multiply-adds per feature it adds.

Candidates are ranked by preference: those whose output a dropout source
reads (where the MC variation enters) before the others, and within each
group the one nearest the output first. They are taken in that order while
the probes' total stays within `max_cost` of the base's estimated cost and
their number within `max_layers`; one that does not fit is skipped, so a
cheaper one further down the list can still be taken. The first
`min_layers` of the list are taken whatever they cost, so a head never has
no layer, and a small model keeps the layers nearest its output.

The estimate is static (shapes and parameter counts, unknown dimensions
counted as 1): `bench/zoo_cost_bench.py` measures what the chosen heads cost.

What a probe computes (`features="auto"`, `probe_features`): per-neuron
values of a recurrent layer's final state, a summary of any other layer. The
final state is the only view a one-pass head has of the noise that input and
recurrent dropout put in over the time steps. A summary of it (mean, norm,
share above 0) did not tell the head enough, per-neuron values did (a likely
reason: how much of the noise reaches the prediction differs from unit to
unit, with each unit's saturation and output weight); docs/zoo.md has the
measurements on LSTM and GRU models. The state is rank 2, so per-neuron
features cost no op in the probe, only a wider matmul in the head's first
layer.
"""

import math

from dropvar_tf._keras import keras
from dropvar_tf import keras_graph
from dropvar_tf import layers as probe_layers
from dropvar_tf import sources
from dropvar_tf import validation

# `features` of `add_variation_head` and `select_layers` besides the probe
# feature sets of `layers.FEATURE_SETS`: chosen per tapped layer.
AUTO = "auto"
FEATURE_CHOICES = (AUTO,) + probe_layers.FEATURE_SETS
# Layers whose rank-2 output is a recurrent final state (LSTM, GRU,
# SimpleRNN and any other `keras.layers.RNN`, and a Bidirectional one).
_RECURRENT = (keras.layers.RNN, keras.layers.Bidirectional)

# Multiply-adds one pass over one element of a tensor is counted as: a
# reduction over an activation runs at memory speed, a matmul's inner loop
# at several multiply-adds per element loaded.
READ_COST = 4
# Passes a "summary" probe makes over its input: mean, L2 norm, sign, and
# the mean of the sign (`layers.ActivationStrength`).
SUMMARY_READS = 4
# Multiply-adds the head's first layer spends per feature: its default width.
HEAD_WIDTH = 16

# Defaults of `layers="auto"`: at most 4 layers, whose probes together are
# estimated at no more than 10% of the base's cost; the 2 most preferred
# are taken whatever they cost.
MAX_LAYERS = 4
MAX_COST = 0.1
MIN_LAYERS = 2


def _size(shape):
  """Elements per example of a shape (batch axis dropped, None as 1)."""
  return math.prod(int(d) if d is not None else 1 for d in shape[1:])


def _positions(shape):
  """Spatial or time positions per example (all axes but batch and last)."""
  return math.prod(int(d) if d is not None else 1 for d in shape[1:-1])


def layer_cost(layer, inputs, outputs):
  """Estimated multiply-adds per example of one call of `layer`.

  Args:
    layer: a Keras layer or op (`keras.ops.*` called in a Functional graph),
      or a nested Functional model (estimated layer by layer).
    inputs: the call's input KerasTensors.
    outputs: the call's output KerasTensors.

  Returns:
    A non-negative number.
  """
  if isinstance(layer, keras.Model) and keras_graph.is_graph_model(layer):
    return model_cost(layer)
  out_elements = sum(_size(t.shape) for t in outputs)
  if isinstance(layer, keras.layers.Embedding):
    return READ_COST * out_elements
  # A kernel is applied at every position of its input (an RNN over time
  # steps) or of its output (a strided conv), whichever has more.
  positions = max([_positions(t.shape) for t in list(inputs) + list(outputs)
                   if len(t.shape) > 1] or [1])
  # A Keras op called on KerasTensors (`keras.ops.sum` in a Functional
  # graph) is an Operation, not a Layer: it has no weights.
  params = (layer.count_params() if isinstance(layer, keras.layers.Layer)
            else 0)
  return params * positions + READ_COST * out_elements


def model_cost(model):
  """Estimated multiply-adds per example of a Functional/Sequential model.

  Args:
    model: a built Functional or Sequential model.

  Returns:
    The sum of `layer_cost` over every call of every layer in its graph.

  Raises:
    ValueError: `model` is not a built Functional or Sequential model.
  """
  validation.check_model(model)
  total = 0
  for layer_id, calls in keras_graph.graph_nodes(model).items():
    for inputs, outputs in calls:
      if not outputs:
        continue
      layer = keras_graph.source_layer(outputs[0])
      if id(layer) != layer_id or isinstance(layer, keras.layers.InputLayer):
        continue
      total += layer_cost(layer, inputs, outputs)
  return total


def probe_cost(shape, features):
  """Estimated multiply-adds per example of probing a tensor of `shape`.

  Args:
    shape: the tapped tensor's shape, batch axis first.
    features: "summary" or "neurons" (`layers.FEATURE_SETS`).

  Returns:
    A non-negative number.
  """
  elements = _size(shape)
  if features == "summary":
    return READ_COST * SUMMARY_READS * elements + HEAD_WIDTH * 3
  channels = int(shape[-1]) if len(shape) > 1 and shape[-1] else 1
  reads = elements if len(shape) > 2 else 0
  return READ_COST * reads + HEAD_WIDTH * channels


def check_features(features):
  """Validates a `features` choice; returns it unchanged.

  Raises:
    ValueError: `features` is not one of `FEATURE_CHOICES`.
  """
  if features not in FEATURE_CHOICES:
    raise validation.invalid("features", f"one of {FEATURE_CHOICES}",
                             features)
  return features


def probe_features(layer, shape, features=AUTO):
  """The feature set a probe on `layer`'s output computes.

  Args:
    layer: the tapped layer.
    shape: its output's shape, batch axis first.
    features: "auto", "summary" or "neurons"; the last two are returned as
      they are.

  Returns:
    "summary" or "neurons": for "auto", "neurons" on the rank-2 output of
    a recurrent layer (its final state; see the module docstring), else
    "summary".

  Raises:
    ValueError: invalid `features`.
  """
  if check_features(features) != AUTO:
    return features
  if isinstance(layer, _RECURRENT) and len(shape) == 2:
    return probe_layers.NEURONS
  return probe_layers.SUMMARY


def _reads_into_source(tensor, consumers):
  """True when a layer reading `tensor` is or holds a dropout source."""
  return any(sources.layer_sources(layer) for layer in consumers.get(
      id(tensor), ()))


def select_layers(model, candidates, features=AUTO,
                  max_layers=MAX_LAYERS, max_cost=MAX_COST,
                  min_layers=MIN_LAYERS):
  """Returns the candidate layers a cost-bounded head taps.

  See the module docstring for the cost model and the preference order.

  Args:
    model: a built Functional or Sequential model.
    candidates: its candidate layers (`heads.candidate_layers(model)`), in
      topological order; each called once, with one output.
    features: "auto", "summary" or "neurons": the features the probes
      compute (`probe_features`).
    max_layers: the most layers to tap (an integer >= 1).
    max_cost: the probes' largest total estimated cost, as a fraction of the
      base's (a number > 0).
    min_layers: the most preferred layers taken whatever they cost (an
      integer >= 1, at most `max_layers`).

  Returns:
    A non-empty sub-list of `candidates` in their order (empty only when
    `candidates` is). The same model and arguments always give the same
    list.

  Raises:
    ValueError: invalid `features`, `max_layers`, `max_cost` or
      `min_layers`.
  """
  check_features(features)
  max_layers = validation.check_int(max_layers, "max_layers", 1)
  min_layers = validation.check_int(min_layers, "min_layers", 1)
  if min_layers > max_layers:
    raise validation.invalid("min_layers",
                             f"an integer <= max_layers={max_layers}",
                             min_layers)
  if (isinstance(max_cost, bool) or not isinstance(max_cost, (int, float))
      or not max_cost > 0 or math.isinf(max_cost)):
    raise validation.invalid("max_cost", "a finite number > 0", max_cost)
  nodes = keras_graph.graph_nodes(model)
  consumers = {}
  for layer in model.layers:
    for inputs, _ in nodes.get(id(layer), ()):
      for t in inputs:
        consumers.setdefault(id(t), []).append(layer)
  budget = max_cost * model_cost(model)
  ranked = []
  for position, layer in enumerate(candidates):
    tensor = nodes[id(layer)][0][1][0]
    ranked.append((not _reads_into_source(tensor, consumers), -position,
                   probe_cost(tensor.shape, probe_features(
                       layer, tensor.shape, features)), layer))
  ranked.sort(key=lambda r: r[:2])
  chosen, spent = set(), 0.0
  for i, (_, _, cost, layer) in enumerate(ranked):
    if len(chosen) == max_layers:
      break
    if i < min_layers or spent + cost <= budget:
      chosen.add(id(layer))
      spent += cost
  return [l for l in candidates if id(l) in chosen]
