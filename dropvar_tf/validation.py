"""Argument checks shared by every public entry point.

One error-message shape, as Keras' own layers have it:
"Invalid value received for argument `num_samples`. Expected an integer >= 2.
Received: num_samples=1".
"""

import math

from dropvar_tf._keras import keras
from dropvar_tf import contract
from dropvar_tf import keras_graph


def invalid(arg, expected, received):
  """Returns a ValueError in the house message shape.

  Args:
    arg: name of the offending argument.
    expected: what was expected, e.g. "an integer >= 2".
    received: the received value (its repr is shown, shortened).
  """
  text = repr(received)
  if len(text) > 200:
    text = text[:200] + "..."
  return ValueError(f"Invalid value received for argument `{arg}`. "
                    f"Expected {expected}. Received: {arg}={text}")


def check_model(model, arg="model", allow_subclassed=False):
  """Validates a model argument (`sources.check_dropout_model` also requires
  dropout).

  Args:
    model: the value to check.
    arg: the argument name used in error messages.
    allow_subclassed: accept subclassed models (those without a symbolic
      graph) too.

  Returns:
    `model`, unchanged.

  Raises:
    ValueError: `model` is None, not a Keras model, a subclassed model (no
      symbolic graph to tap) unless `allow_subclassed`, or unbuilt (no
      defined inputs).
  """
  if model is None or not isinstance(model, keras.Model):
    raise invalid(arg, "a built Functional or Sequential `keras.Model`",
                  model if model is None else type(model).__name__)
  graph = keras_graph.is_graph_model(model)
  if not graph and not allow_subclassed:
    raise invalid(
        arg,
        "a Functional or Sequential `keras.Model`; subclassed models have no "
        "symbolic graph to tap. Rebuild it with the Functional API (or wrap "
        "its layers in `keras.Sequential`)",
        f"subclassed model of type {type(model).__name__}")
  if graph:
    try:
      inputs = model.inputs
    except (AttributeError, ValueError):
      inputs = None
  else:
    inputs = True  # A subclassed model defines its inputs when first built.
  if not model.built or not inputs:
    raise invalid(
        arg,
        "a built model with defined inputs (start a Sequential model with "
        "`keras.Input(shape)` or call `model.build(input_shape)`)",
        f"unbuilt model {model.name!r}")
  return model


def check_int(value, arg, minimum):
  """Validates an integer argument >= `minimum` and returns it as int."""
  if isinstance(value, bool) or not isinstance(value, (int,)) and not (
      hasattr(value, "__index__")):
    raise invalid(arg, f"an integer >= {minimum}", value)
  value = int(value)
  if value < minimum:
    raise invalid(arg, f"an integer >= {minimum}", value)
  return value


def check_number(value, arg, expected, ok):
  """Validates a finite real number for which `ok(value)` holds; returns it
  as a float. `expected` describes the valid values for the message."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
      hasattr(value, "__float__") and not isinstance(value, str)):
    raise invalid(arg, expected, value)
  number = float(value)
  if not math.isfinite(number) or not ok(number):
    raise invalid(arg, expected, value)
  return number


def statistic_per_output(statistic, names, count):
  """The `statistic` argument as one unresolved statistic per output.

  Args:
    statistic: a statistic, or a dict of them keyed by output name.
    names: the model's output names, or None for one output.
    count: the number of outputs.

  Raises:
    ValueError: a dict whose keys are not the output names.
  """
  if isinstance(statistic, dict) and names is not None:
    if sorted(statistic) != sorted(names):
      raise invalid(
          "statistic", f"one of {contract.STATISTICS}, or a dict of them "
          f"keyed by the output names {names}", statistic)
    return [statistic[n] for n in names]
  return [statistic] * count


def resolve_statistic(statistic, units, probabilities=True):
  """Validates a DPV statistic name and resolves "auto".

  Args:
    statistic: one of `contract.STATISTICS`.
    units: number of output units of the model (product of the output shape
      after the batch axis).
    probabilities: the units are class probabilities (see
      `keras_graph.output_is_probabilities`).

  Returns:
    The concrete statistic: "auto" becomes "std" for one output unit,
    "predicted_class_std" for several class probabilities, and
    "per_class_std" (the std of each unit) for several other outputs.

  Raises:
    ValueError: unknown statistic.
  """
  if not isinstance(statistic, str) or statistic not in contract.STATISTICS:
    raise invalid("statistic", f"one of {contract.STATISTICS}", statistic)
  if statistic == contract.STAT_AUTO:
    if units == 1:
      return contract.STAT_STD
    return (contract.STAT_PREDICTED_CLASS_STD if probabilities
            else contract.STAT_PER_CLASS_STD)
  return statistic
