"""Argument checks shared by every public entry point.

One error-message shape, as Keras' own layers have it:
"Invalid value received for argument `num_samples`. Expected an integer >= 2.
Received: num_samples=1".
"""

import numpy as np

from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
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


def _spec_text(model):
  """`model`'s input spec, for error messages: name, dtype and shape."""
  parts = [f"{t.name}: {t.dtype}, shape {tuple(t.shape)}"
           for t in tf.nest.flatten(keras_graph.model_input(model))]
  noun = "input" if len(parts) == 1 else "inputs"
  return f"{noun} matching the model's input spec ({'; '.join(parts)})"


def _array_text(leaves):
  return "; ".join(f"{v.dtype} array of shape {v.shape}" for v in leaves)


def _compatible_shape(shape, ref):
  """Whether `shape` (with batch axis) feeds an input of shape `ref`.

  Keras' Functional models accept one extra trailing axis of size 1, or one
  missing trailing axis where the input's last axis has size 1.
  """
  ref = tuple(ref)
  if len(shape) == len(ref) + 1 and shape[-1] == 1:
    shape = shape[:-1]
  elif len(shape) == len(ref) - 1 and ref[-1] == 1:
    shape = tuple(shape) + (1,)
  if len(shape) != len(ref):
    return False
  return all(r is None or s is None or int(s) == int(r)
             for s, r in zip(shape[1:], ref[1:]))


def _compatible_dtype(dtype, ref):
  """Numeric data for numeric inputs, strings for string inputs."""
  kind = np.dtype(dtype).kind if not isinstance(dtype, tf.dtypes.DType) else (
      "S" if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).kind)
  if str(ref) == "string":
    return kind in "SUO"
  return kind in "biuf"


def _flat_inputs(model, x):
  """Flattens `x` in the order of `model`'s flattened inputs."""
  spec = keras_graph.model_input(model)
  if isinstance(spec, dict) and isinstance(x, dict) and (
      sorted(spec) != sorted(x)):
    raise invalid("x", _spec_text(model), f"a dict with keys {sorted(x)}")
  leaves = tf.nest.flatten(x)
  refs = tf.nest.flatten(spec)
  if len(leaves) != len(refs):
    raise invalid("x", _spec_text(model), f"{len(leaves)} arrays")
  return leaves, refs


def _bad_rows(leaves):
  """Number of rows with a NaN or Inf in any float leaf."""
  bad = np.zeros(len(leaves[0]), bool)
  for v in leaves:
    if v.dtype.kind == "f" and v.size:
      bad |= ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
  return int(bad.sum())


def check_inputs(model, x):
  """Validates model inputs `x` before any TF op sees them.

  Args:
    model: a model accepted by `check_model`; its input spec is the
      reference.
    x: a numpy array, a list or dict of arrays, or a `tf.data.Dataset` of
      examples or of batches. Datasets are read once to count their rows.

  Returns:
    The number of examples in `x`.

  Raises:
    ValueError: naming `x`: a structure, rank, width or dtype that does not
      match the model's input spec; no examples; or NaN/Inf values (with the
      number of rows that have them).
  """
  if isinstance(x, tf.data.Dataset):
    return _check_dataset(model, x)
  leaves, refs = _flat_inputs(model, x)
  leaves = [np.asarray(v) for v in leaves]
  for v, ref in zip(leaves, refs):
    if (not _compatible_dtype(v.dtype, ref.dtype) or
        not _compatible_shape(v.shape, ref.shape)):
      raise invalid("x", _spec_text(model), _array_text(leaves))
  rows = len(leaves[0])
  if not rows:
    raise invalid("x", "at least one example", _array_text(leaves))
  bad = _bad_rows(leaves)
  if bad:
    raise invalid("x", "finite values (no NaN or Inf)",
                  f"{bad} of {rows} rows with NaN or Inf values")
  return rows


def _check_dataset(model, dataset):
  """`check_inputs` for a Dataset: spec first, then one counting pass."""
  leaves, refs = _flat_inputs(model, dataset.element_spec)
  specs = [(tuple(s.shape), s.dtype) for s in leaves]
  batched = all(_compatible_shape(shape, ref.shape)
                for (shape, _), ref in zip(specs, refs))
  unbatched = all(_compatible_shape((None,) + shape, ref.shape)
                  for (shape, _), ref in zip(specs, refs))
  if not (batched or unbatched) or not all(
      _compatible_dtype(dtype, ref.dtype)
      for (_, dtype), ref in zip(specs, refs)):
    raise invalid("x", _spec_text(model) + " (a Dataset of examples or of "
                  "batches)", f"a Dataset with element_spec "
                  f"{dataset.element_spec}")

  def count(state, element):
    flat = [tf.reshape(v, [tf.shape(v)[0], tf.reduce_prod(tf.shape(v)[1:])])
            if batched else tf.reshape(v, [1, -1])
            for v in tf.nest.flatten(element)]
    rows = tf.shape(flat[0], out_type=tf.int64)[0]
    bad = tf.zeros([rows], bool)
    for v in flat:
      if v.dtype.is_floating:
        bad |= tf.reduce_any(~tf.math.is_finite(v), axis=1)
    return state + tf.stack([rows, tf.reduce_sum(tf.cast(bad, tf.int64))])

  rows, bad = (int(v) for v in dataset.reduce(
      tf.zeros([2], tf.int64), count))
  if not rows:
    raise invalid("x", "at least one example", "an empty Dataset")
  if bad:
    raise invalid("x", "finite values (no NaN or Inf)",
                  f"{bad} of {rows} rows with NaN or Inf values")
  return rows
