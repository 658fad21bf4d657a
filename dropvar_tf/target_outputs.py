"""The outputs of a model as MC-dropout targets see them.

`mc_dropout_targets` accumulates float64 sums of every output unit side by
side; this module turns them into targets: per-unit stds, reduced with each
output's DPV statistic (`contract`), shaped per output. A model with one
output gets one array; a model with several (a list or a flat dict of
tensors) gets a dict of arrays keyed by output name
(`keras_graph.output_names`), each what a model with that output alone gets.
"""

import numpy as np

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import validation


def std_from_sums(s1, s2, n):
  """Population std from the sum `s1` and sum of squares `s2` of n values."""
  mean = s1 / n
  return np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))


def reduce(std, det, statistic, out_shape):
  """Applies the DPV statistic to per-unit stds (N, k)."""
  if statistic == contract.STAT_PREDICTED_CLASS_STD:
    cls = np.argmax(det, axis=-1)
    return std[np.arange(std.shape[0]), cls].astype(np.float32)
  if std.shape[1] == 1:
    return std[:, 0].astype(np.float32)
  return std.reshape((std.shape[0],) + tuple(out_shape)).astype(np.float32)


def concat(parts, out_shape, statistic):
  """Joins one output's chunks of targets (an empty array of its shape)."""
  if parts:
    return np.concatenate(parts).astype(np.float32)
  units = int(np.prod(out_shape, dtype=np.int64))
  shape = (0,) if statistic == contract.STAT_PREDICTED_CLASS_STD or (
      units == 1) else (0,) + tuple(out_shape)
  return np.zeros(shape, np.float32)


class TargetOutputs:
  """The outputs of a model: names, static shapes and resolved statistics.

  One output (`names` None) keeps the single-array targets; several give a
  dict of target arrays keyed by output name, each as one output's would
  be. Chunks of several outputs are kept as one (n, width) array, the
  outputs' reduced columns side by side.
  """

  def __init__(self, names, shapes, statistics):
    self.names = names
    self.shapes = shapes
    self.statistics = statistics

  def _width(self, shape, statistic):
    units = int(np.prod(shape, dtype=np.int64))
    return 1 if statistic == contract.STAT_PREDICTED_CLASS_STD else units

  def settings(self):
    """The statistic and output shape settings of a target store."""
    if self.names is None:
      return self.statistics[0], list(self.shapes[0])
    return (dict(zip(self.names, self.statistics)),
            {n: list(s) for n, s in zip(self.names, self.shapes)})

  def finalize(self, det, sums, num_samples):
    s1, s2 = sums
    std = std_from_sums(s1, s2, num_samples)
    if self.names is None:
      return reduce(std, det, self.statistics[0], self.shapes[0])
    columns, start = [], 0
    for shape, statistic in zip(self.shapes, self.statistics):
      stop = start + int(np.prod(shape, dtype=np.int64))
      value = reduce(std[:, start:stop], det[:, start:stop], statistic,
                      shape)
      columns.append(value.reshape(len(value), -1))
      start = stop
    return np.concatenate(columns, axis=1)

  def concat(self, parts):
    if self.names is None:
      return concat(parts, self.shapes[0], self.statistics[0])
    widths = [self._width(s, t) for s, t in zip(self.shapes,
                                                 self.statistics)]
    flat = (np.concatenate(parts) if parts else
            np.zeros((0, sum(widths)))).astype(np.float32)
    out, start = {}, 0
    for name, shape, width in zip(self.names, self.shapes, widths):
      value = flat[:, start:start + width]
      out[name] = value[:, 0] if width == 1 else value.reshape(
          (-1,) + tuple(shape))
      start += width
    return out


def resolve(model, statistic):
  """The `TargetOutputs` of `model` with `statistic` resolved per output.

  Args:
    model: a Functional or Sequential model (see `targets.spec_model`).
    statistic: one of `contract.STATISTICS`, applied to every output, or for
      several outputs a dict of them keyed by output name.

  Raises:
    ValueError: nested outputs, an output without a static shape, or an
      invalid `statistic` (each naming the argument).
  """
  try:
    names = keras_graph.output_names(model)
  except ValueError as e:
    raise validation.invalid("model", "a model whose outputs are a tensor, "
                             "a list or a flat dict of tensors", str(e)) from e
  tensors = keras_graph.select_outputs(keras_graph.output_structure(model),
                                       names)
  wanted = validation.statistic_per_output(statistic, names, len(tensors))
  shapes, statistics = [], []
  for tensor, stat in zip(tensors, wanted):
    validation.resolve_statistic(stat, 1)  # validate before the model
    out_shape = tuple(tensor.shape[1:])
    if any(d is None for d in out_shape):
      raise validation.invalid("model", "a model with a static output shape",
                               f"output shape {tensor.shape}")
    units = int(np.prod(out_shape, dtype=np.int64))
    shapes.append(out_shape)
    statistics.append(validation.resolve_statistic(
        stat, units, keras_graph.output_is_probabilities(model, tensor)))
  return TargetOutputs(names, shapes, statistics)
