"""One input contract for every step: model inputs read in one place.

`normalize(model, x)` is how `perturb_inputs` (given its model),
`mc_dropout_targets`, `split_half_targets`, `fit_variation_head`,
`train_variation_head`, `predict` and `check_inputs` read their inputs `x`,
and `export_saved_model` its warm-up examples. It accepts what the model
takes:

* a numpy array (or anything `np.asarray` takes, or a `tf.Tensor`) for a
  single-input model;
* a dict of arrays keyed by the input names (dict inputs, or the
  `keras.Input` names of list or single inputs);
* a list or tuple with one array per input (multi-input models);
* numpy string arrays of dtype `<U..`, `S..` or object (of `str` or
  `bytes`) for string inputs: read as object arrays of UTF-8 bytes, as
  TensorFlow reads them, so every string form gives the same tensors;
* `tf.RaggedTensor` for inputs declared `keras.Input(..., ragged=True)`
  (a dense array, or an object array of variable-length rows, is
  converted);
* a finite `tf.data.Dataset` of examples or of batches (told apart by rank
  against the model's inputs), of `x` alone or of `(x, y)` or
  `(x, y, sample_weight)` tuples (or `(x,)`, as Keras reads them); `y` is
  ignored, except by
  `fit_variation_head`, which takes it as the targets.

Inputs are checked against the model's input spec (structure, rank, fixed
widths, dtype kind), must hold at least one example, and float values must
be finite; every refusal is a `ValueError` naming the argument. Subclassed
models have no input spec: their inputs are read and counted unchecked.
"""

import numpy as np

from dropvar_tf import keras_graph
from dropvar_tf import validation
from dropvar_tf._keras import tf

# Rows per batch when a Dataset is read to check and count it.
_READ_ROWS = 4096
# The serving signature feeds a ragged input `name` as two dense inputs: the
# rows padded to the longest (`name`) and their lengths (this suffix).
ROW_LENGTHS_SUFFIX = "_row_lengths"


def _is_ragged(value):
  return isinstance(value, (tf.RaggedTensor, tf.RaggedTensorSpec))


def ragged_input(ref):
  """Whether the model input `ref` (a KerasTensor) is declared ragged."""
  return bool(getattr(ref, "ragged", False))


def model_spec(model):
  """`model`'s symbolic input structure; None for a subclassed model."""
  if not keras_graph.is_graph_model(model):
    return None
  return keras_graph.model_input(model)


def spec_text(model):
  """`model`'s input spec for error messages: name, dtype and shape."""
  parts = [f"{t.name}: {t.dtype}, shape {tuple(t.shape)}"
           + (", ragged" if ragged_input(t) else "")
           for t in tf.nest.flatten(model_spec(model))]
  noun = "input" if len(parts) == 1 else "inputs"
  return f"{noun} matching the model's input spec ({'; '.join(parts)})"


def _leaf_text(v):
  if _is_ragged(v):
    return f"ragged {v.dtype.name} array of shape {tuple(v.shape)}"
  return f"{v.dtype} array of shape {tuple(v.shape)}"


def _leaves_text(leaves):
  return "; ".join(_leaf_text(v) for v in leaves)


def _compatible_shape(shape, ref):
  """Whether `shape` (with batch axis) feeds an input of shape `ref`.

  Keras' Functional models accept one extra trailing axis of size 1, or one
  missing trailing axis where the input's last axis has size 1.
  """
  shape, ref = tuple(shape), tuple(ref)
  if len(shape) == len(ref) + 1 and shape[-1] == 1:
    shape = shape[:-1]
  elif len(shape) == len(ref) - 1 and ref[-1] == 1:
    shape = shape + (1,)
  if len(shape) != len(ref):
    return False
  return all(r is None or s is None or int(s) == int(r)
             for s, r in zip(shape[1:], ref[1:]))


def _to_model_rank(value, ref):
  """`value` (with batch axis) at the rank of the input `ref`.

  Keras squeezes an extra trailing axis of size 1, or adds a missing one,
  on every call; done once here, every step sees one rank, so that a
  `tf.function` traced on one rank is never retraced (and generalised to
  an unknown rank) by a call with the other.
  """
  if _is_ragged(value) or ref is None:
    return value
  rank = len(ref.shape)
  if len(value.shape) == rank + 1:
    return value[..., 0]
  if len(value.shape) == rank - 1:
    return value[..., None]
  return value


def _compatible_dtype(dtype, ref):
  """Numeric data for numeric inputs, strings for string inputs."""
  if isinstance(dtype, tf.DType):
    kind = "S" if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).kind
  else:
    kind = np.dtype(dtype).kind
  if str(ref) == "string":
    return kind in "SUO"
  return kind in "biuf"


def _match(spec, x, model, arg):
  """`x` arranged as the model's input structure `spec` (leaves as given).

  Raises:
    ValueError: `x` has other keys or another number of leaves.
  """
  refs = tf.nest.flatten(spec)
  if isinstance(spec, dict) and isinstance(x, dict):
    keys = list(spec)
  else:
    keys = [t.name for t in refs]
  if isinstance(x, dict):
    if sorted(keys) != sorted(x):
      raise validation.invalid(arg, spec_text(model),
                               f"a dict with keys {sorted(x)}")
    leaves = [x[k] for k in keys]
  elif isinstance(x, (list, tuple)):
    leaves = list(x)
  else:
    leaves = [x]
  # Named inputs are matched by name only: a list has no names.
  if len(leaves) != len(refs) or any(tf.nest.is_nested(v) for v in leaves) or (
      isinstance(spec, dict) and not isinstance(x, dict)):
    raise validation.invalid(arg, spec_text(model),
                             f"{len(tf.nest.flatten(x))} arrays")
  if isinstance(spec, dict):
    return dict(zip(keys, leaves))
  return tf.nest.pack_sequence_as(spec, leaves)


def _read_leaf(value, ref, arg):
  """A numpy array, or a RaggedTensor for a ragged input `ref`."""
  if isinstance(value, tf.Tensor):
    value = value.numpy()
  if _is_ragged(value):
    return value
  value = np.asarray(value)
  if ref is None or not ragged_input(ref):
    return value
  dtype = tf.as_dtype(ref.dtype)
  try:
    if value.dtype == object and value.ndim == 1 and not any(
        isinstance(r, (str, bytes)) for r in value):
      # Variable-length rows in an object array.
      return tf.ragged.constant([np.asarray(r).tolist() for r in value],
                                dtype=dtype)
    if value.ndim >= 2:
      return tf.RaggedTensor.from_tensor(tf.constant(value, dtype))
  except (TypeError, ValueError, tf.errors.InvalidArgumentError) as e:
    raise validation.invalid(arg, f"rows of {dtype.name} values for the "
                             f"ragged input {ref.name!r}",
                             _leaf_text(value)) from e
  return value


def _strings_as_bytes(value, arg):
  """String arrays as object arrays of UTF-8 bytes (TF's own reading)."""
  if _is_ragged(value) or value.dtype.kind not in "SUO":
    return value
  try:
    return tf.constant(value, tf.string).numpy()
  except (TypeError, ValueError) as e:
    raise validation.invalid(
        arg, "strings (str or bytes) in a string array",
        f"an object array of {type(value.flat[0]).__name__}") from e


def _num_rows(leaf):
  if _is_ragged(leaf):
    return int(leaf.shape[0]) if leaf.shape.rank else None
  return len(leaf) if np.ndim(leaf) else None


def _bad_rows(leaves, rows):
  """Number of rows with a NaN or Inf in any float leaf."""
  bad = np.zeros(rows, bool)
  for v in leaves:
    if _is_ragged(v):
      if not v.dtype.is_floating:
        continue
      finite = tf.math.is_finite(v)
      for _ in range(v.shape.rank - 1):
        finite = tf.reduce_all(finite, axis=-1)
      bad |= ~np.asarray(finite)
    elif v.dtype.kind == "f" and v.size:
      bad |= ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
  return int(bad.sum())


def _check_values(structure, arg):
  """(rows, rows with NaN/Inf) of an in-memory structure.

  Raises:
    ValueError: the leaves have different numbers of rows.
  """
  leaves = tf.nest.flatten(structure)
  rows = {_num_rows(v) for v in leaves}
  if len(rows) != 1 or None in rows:
    raise validation.invalid(
        arg, "arrays of one common length",
        {k: _num_rows(v) for k, v in structure.items()}
        if isinstance(structure, dict) else [_num_rows(v) for v in leaves])
  rows = rows.pop()
  return rows, _bad_rows(leaves, rows)


class ModelInputs:
  """Inputs of a model, normalised (see the module docstring).

  Attributes:
    num_examples: number of examples.
    x: in-memory inputs in the model's input structure (numpy leaves,
      strings as object arrays of bytes, `tf.RaggedTensor` for ragged
      inputs); None for a Dataset.
    dataset: the Dataset of single examples in the model's input structure;
      None for in-memory inputs.
    labels_dataset: the Dataset of single labels `y` when the Dataset held
      `(x, y)` tuples, else None.
  """

  def __init__(self, x=None, dataset=None, labels_dataset=None,
               ragged=False):
    self.x = x
    self.dataset = dataset
    self.labels_dataset = labels_dataset
    self.ragged = ragged
    self.num_examples = None

  def _batched(self, dataset, rows):
    return dataset.ragged_batch(rows) if self.ragged else dataset.batch(rows)

  def batches(self, rows):
    """Yields the inputs in chunks of up to `rows` examples, in order."""
    if self.dataset is None:
      total = _num_rows(tf.nest.flatten(self.x)[0])
      for start in range(0, total, rows):
        yield slice_rows(self.x, start, min(start + rows, total))
      return
    for chunk in self._batched(self.dataset, rows):
      yield tf.nest.map_structure(
          lambda v: v if _is_ragged(v) else v.numpy(), chunk)

  def labels(self):
    """The `y` of a Dataset of `(x, y)` tuples, else None.

    One array, or a dict of arrays when `y` is a dict (the targets of a
    multi-output dual).
    """
    if self.labels_dataset is None:
      return None
    parts = list(self.labels_dataset.batch(_READ_ROWS).as_numpy_iterator())
    if not parts:
      return None
    return tf.nest.map_structure(lambda *v: np.concatenate(v), *parts)

  def materialize(self):
    """The inputs in memory, in the model's input structure."""
    if self.dataset is None:
      return self.x
    parts = list(self.batches(_READ_ROWS))
    return tf.nest.map_structure(
        lambda *v: tf.concat(v, 0) if _is_ragged(v[0]) else np.concatenate(v),
        *parts)

  def as_dataset(self, batch_size):
    """A Dataset of batches of `batch_size` examples, for Keras' `predict`.

    Keras' `predict` refuses numpy string arrays (Keras 3.15: "Invalid
    dtype: str32"); it takes them in a Dataset (`predicting.predict`).
    """
    if self.dataset is None:
      # A list would be read as one stacked tensor: tf.data takes tuples.
      x = tuple(self.x) if isinstance(self.x, list) else self.x
      dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    else:
      dataset = self._batched(self.dataset, batch_size)
    # One-element tuples: Keras reads a pair as (x, y).
    return dataset.map(lambda *x: (x[0] if len(x) == 1 else x,))


def _dataset_parts(spec, element, model, arg):
  """(x spec, has labels): the part of a Dataset element the model takes.

  `Dataset.map` passes a tuple's items as arguments, so a one-element
  tuple `(x,)` reaches it as `x`: only `(x, y)` and `(x, y, w)` need
  picking.
  """
  try:
    return _match(spec, element, model, arg), False
  except ValueError:
    if not (isinstance(element, tuple) and len(element) in (1, 2, 3)):
      raise
    return _match(spec, element[0], model, arg), len(element) > 1


def _normalize_dataset(model, spec, dataset, arg):
  x_spec, has_labels = _dataset_parts(spec, dataset.element_spec, model, arg)
  leaves = tf.nest.flatten(x_spec)
  refs = tf.nest.flatten(spec)
  shapes = [tuple(s.shape) for s in leaves]
  batched = all(_compatible_shape(s, r.shape) for s, r in zip(shapes, refs))
  unbatched = all(_compatible_shape((None,) + s, r.shape)
                  for s, r in zip(shapes, refs))
  if batched and unbatched:
    # A rank fits both ways only through Keras' trailing axis of size 1:
    # the exact ranks decide.
    batched = all(len(s) == len(r.shape) for s, r in zip(shapes, refs))
  if not (batched or unbatched) or not all(
      _compatible_dtype(s.dtype, r.dtype) for s, r in zip(leaves, refs)) or (
          any(_is_ragged(s) and not ragged_input(r)
              for s, r in zip(leaves, refs))):
    raise validation.invalid(
        arg, spec_text(model) + " (a Dataset of examples or of batches)",
        f"a Dataset with element_spec {dataset.element_spec}")
  if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
    raise validation.invalid(arg, "a finite Dataset", "an infinite Dataset")

  def part(index, rebuild):
    def fn(*element):
      element = element[0] if len(element) == 1 else element
      if has_labels:
        element = element[index]
      return rebuild(element)
    return fn

  def model_rank(element):
    leaves = tf.nest.flatten(_match(spec, element, model, arg))
    if not batched:
      # Examples: the rank check counts the batch axis.
      leaves = [_to_model_rank(v[None], r)[0] if not _is_ragged(v) else v
                for v, r in zip(leaves, refs)]
    else:
      leaves = [_to_model_rank(v, r) for v, r in zip(leaves, refs)]
    return tf.nest.pack_sequence_as(spec, leaves)

  x_dataset = dataset.map(part(0, model_rank))
  labels_dataset = dataset.map(part(1, lambda e: e)) if has_labels else None
  if batched:
    x_dataset = x_dataset.unbatch()
    labels_dataset = labels_dataset and labels_dataset.unbatch()
  return ModelInputs(dataset=x_dataset, labels_dataset=labels_dataset,
                     ragged=any(ragged_input(r) for r in refs))


# float32 holds every integer up to 2**24 exactly, and not all above it.
_FLOAT32_EXACT = 2**24


def _check_exact_in_float(value, ref, arg):
  """Refuses integers a float32 input would change (ids of a model whose
  recorded inputs are float32: a bare subclassed one, see
  `keras_graph.functional_view`)."""
  if (isinstance(value, np.ndarray) and value.dtype.kind in "iu" and
      value.size and tf.as_dtype(ref.dtype) == tf.float32 and
      np.max(np.abs(value.astype(np.float64))) > _FLOAT32_EXACT):
    raise validation.invalid(
        arg, f"integers up to 2**24 in magnitude for a float32 input "
        f"({ref.name}): larger ones are rounded. For integer ids, wrap the "
        "model in a Functional model with an integer `keras.Input`",
        f"integers up to {int(np.max(np.abs(value.astype(np.float64))))}")


def normalize(model, x, arg="x"):
  """Reads, checks and counts inputs `x` of `model`.

  Args:
    model: a Keras model; its input spec (when it has one) is the
      reference.
    x: the inputs, in any form of the module docstring.
    arg: the argument name used in error messages.

  Returns:
    A `ModelInputs`. A Dataset is read once, to check and count it.

  Raises:
    ValueError: naming `arg`: None; a structure, rank, width or dtype that
      does not match the model's input spec; rows of unequal counts; no
      examples; NaN/Inf values (with the number of rows that have them); or
      an infinite Dataset.
  """
  if x is None:
    raise validation.invalid(
        arg, "a numpy array, a list or dict of arrays, a tf.RaggedTensor or "
        "a tf.data.Dataset", x)
  spec = model_spec(model)
  if isinstance(x, tf.data.Dataset):
    if spec is None:
      raise validation.invalid(
          arg, "arrays for a model without an input spec (subclassed)",
          "a Dataset")
    inputs = _normalize_dataset(model, spec, x, arg)
    rows = bad = 0
    for chunk in inputs.batches(_READ_ROWS):
      n, b = _check_values(chunk, arg)
      rows, bad = rows + n, bad + b
    empty = "an empty Dataset"
  else:
    if spec is None:
      structure = tf.nest.map_structure(
          lambda v: _strings_as_bytes(_read_leaf(v, None, arg), arg), x)
    else:
      refs = tf.nest.flatten(spec)
      leaves = [_read_leaf(v, r, arg) for v, r in zip(
          tf.nest.flatten(_match(spec, x, model, arg)), refs)]
      for v, ref in zip(leaves, refs):
        if (not _compatible_dtype(v.dtype, ref.dtype) or
            not _compatible_shape(v.shape, ref.shape) or
            _is_ragged(v) != ragged_input(ref)):
          raise validation.invalid(arg, spec_text(model),
                                   _leaves_text(leaves))
        _check_exact_in_float(v, ref, arg)
      structure = tf.nest.pack_sequence_as(
          spec, [_strings_as_bytes(_to_model_rank(v, r), arg)
                 for v, r in zip(leaves, refs)])
    inputs = ModelInputs(x=structure, ragged=any(
        _is_ragged(v) for v in tf.nest.flatten(structure)))
    rows, bad = _check_values(structure, arg)
    empty = _leaves_text(tf.nest.flatten(structure))
  if not rows:
    raise validation.invalid(arg, "at least one example", empty)
  if bad:
    raise validation.invalid(arg, "finite values (no NaN or Inf)",
                             f"{bad} of {rows} rows with NaN or Inf values")
  inputs.num_examples = rows
  if inputs.dataset is not None:
    # A known size: Keras' `predict` warns at the end of a Dataset without.
    size = tf.data.experimental.assert_cardinality(rows)
    inputs.dataset = inputs.dataset.apply(size)
    if inputs.labels_dataset is not None:
      inputs.labels_dataset = inputs.labels_dataset.apply(size)
  return inputs


# ---------------------------------------------------------------------------
# Rows of normalised inputs (numpy leaves and RaggedTensors).


def num_rows(x):
  """Number of rows (examples) of the structure `x`."""
  return _num_rows(tf.nest.flatten(x)[0])


def slice_rows(x, start, stop):
  """Rows [start, stop) of every leaf of the structure `x`."""
  return tf.nest.map_structure(lambda v: v[start:stop], x)


def take_rows(x, indices):
  """Rows `indices` (in that order, repeats allowed) of every leaf of `x`."""
  return tf.nest.map_structure(
      lambda v: tf.gather(v, indices) if _is_ragged(v) else v[indices], x)


def to_tensors(x):
  """Every leaf as a tensor (RaggedTensors stay ragged)."""
  return tf.nest.map_structure(
      lambda v: v if _is_ragged(v) else tf.convert_to_tensor(v), x)


def tile_rows(x, multiples):
  """Every leaf repeated `multiples` times along the batch axis (in graph)."""
  def tile(v):
    if _is_ragged(v):
      return tf.concat([v] * multiples, axis=0)
    return tf.tile(v, [multiples] + [1] * (len(v.shape) - 1))
  return tf.nest.map_structure(tile, x)


def hashable(x):
  """`x` with numpy leaves whose bytes identify it, for content hashes.

  String leaves become their lengths and their concatenated bytes (object
  arrays hold pointers); ragged leaves their values and row splits.
  """
  def parts(v):
    if _is_ragged(v):
      return [parts(v.flat_values)] + [np.asarray(s) for s in
                                       v.nested_row_splits]
    v = np.asarray(v)
    if v.dtype == object:
      flat = [bytes(b) for b in v.ravel()]
      return [np.array([len(b) for b in flat], np.int64).reshape(v.shape),
              np.frombuffer(b"".join(flat), np.uint8)]
    return v
  return tf.nest.map_structure(parts, x)


# ---------------------------------------------------------------------------
# The serving signature's dense form of ragged inputs.


def ragged_to_serving(name, value, arg):
  """{name: rows padded to the longest, name_row_lengths: (N,) int64}.

  Raises:
    ValueError: naming `arg`: `value` has more than one ragged dimension.
  """
  if value.ragged_rank != 1:
    raise validation.invalid(
        arg, f"a ragged input {name!r} with one ragged dimension "
        "(ragged_rank 1)", f"ragged_rank {value.ragged_rank}")
  return {name: value.to_tensor().numpy(),
          name + ROW_LENGTHS_SUFFIX: value.row_lengths().numpy().astype(
              np.int64)}


def ragged_from_serving(padded, lengths):
  """The RaggedTensor of `ragged_to_serving`'s two dense tensors."""
  return tf.RaggedTensor.from_tensor(padded, lengths=lengths)


def check_inputs(model, x):
  """Validates model inputs `x` before any TF op sees them.

  Args:
    model: a model accepted by `check_model`; its input spec is the
      reference.
    x: inputs in any form `normalize` reads: a numpy
      array (strings of any numpy dtype included), a list or dict of
      arrays, `tf.RaggedTensor`s for ragged inputs, or a `tf.data.Dataset`
      of examples or of batches, of `x` or of `(x, y)`. Datasets are read
      once to count their rows.

  Returns:
    The number of examples in `x`.

  Raises:
    ValueError: naming `x`: a structure, rank, width or dtype that does not
      match the model's input spec; no examples; or NaN/Inf values (with the
      number of rows that have them).
  """
  return normalize(model, x).num_examples
