"""TF Serving's JSON tensor format, for the REST API of both ends.

It follows `tensorflow_serving/util/json_tensor.cc`:

- A Predict request holds either `"instances"` (the row format: a list with
  one entry per example; an entry is a value or list for a single-input
  signature, or an object {input: value} naming every input) or `"inputs"`
  (the columnar format: one value or list for a single input, or an object
  {input: whole batch}), and optionally `"signature_name"`.
- Bytes are written as `{"b64": "<base64>"}`; a DT_STRING value may also be
  a plain JSON string.
- The answer to the row format is `{"predictions": [...]}`, one entry per
  example (an object {output: value} when there are several outputs); the
  answer to the columnar format is `{"outputs": ...}` (an object {output:
  whole batch} when there are several outputs).
- Floats are written in their shortest round-trip form; NaN and infinities
  as the bare tokens `NaN`, `Infinity` and `-Infinity`, which are read back
  too.

Errors are `ServingError`s with code INVALID_ARGUMENT and TF Serving's
wording where it has one.
"""

import base64
import binascii
import json
import math

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from tensorflow.core.framework import types_pb2

ROW = "row"
COLUMNAR = "columnar"

_BASE64_KEY = "b64"
# TF Serving writes DT_STRING outputs whose alias ends with this as base64.
_BYTES_SUFFIX = "_bytes"
_INT_KINDS = "iu"
_FLOAT_KINDS = "iuf"


def _debug_string(value):
  """A JSON value as TF Serving quotes it in errors (compact, bounded)."""
  text = json.dumps(value, separators=(",", ":"), allow_nan=True,
                    default=str)
  return text if len(text) <= 100 else text[:97] + "..."


def _parse_float(text):
  """A JSON number with a fraction or exponent; one too big for a double
  (1e400) is a parse error, as in TF Serving's parser, not infinity."""
  value = float(text)
  if math.isinf(value):
    raise ValueError(f"Number too big to be stored in double: {text}")
  return value


def is_base64_object(value):
  """Whether a JSON value is TF Serving's {"b64": ...}: bytes, not a row."""
  return isinstance(value, dict) and len(value) == 1 and _BASE64_KEY in value


def _decode_base64(value):
  if not isinstance(value.get(_BASE64_KEY), str):
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(value)} not formatted correctly for "
        "base64 data")
  try:
    return base64.b64decode(value[_BASE64_KEY], validate=True)
  except (binascii.Error, ValueError):
    raise errors.invalid_argument("Unable to base64 decode") from None


def _json_type(value):
  if value is None:
    return "Null"
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, (int, float)):
    return "Number"
  if isinstance(value, str):
    return "String"
  return "Object" if isinstance(value, dict) else "Array"


def _dense_shape(value):
  """The shape read along the first element of each nested list."""
  shape = []
  while isinstance(value, list):
    shape.append(len(value))
    if not value:
      break
    value = value[0]
  return shape


def _check_leaf(value, dtype_enum):
  """Raises TF Serving's type error when a JSON leaf cannot be `dtype`."""
  if dtype_enum == types_pb2.DT_STRING:
    ok = isinstance(value, str) or is_base64_object(value)
  elif dtype_enum == types_pb2.DT_BOOL:
    ok = isinstance(value, bool)
  elif isinstance(value, bool) or not isinstance(value, (int, float)):
    ok = False
  else:
    ok = not (isinstance(value, float) and np.dtype(
        tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype).kind in _INT_KINDS)
  if not ok:
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(value)} Type: {_json_type(value)} is not "
        f"of expected type: {codec.dtype_name(dtype_enum)}")


def _check_nesting(value, shape, dtype_enum, level=0):
  """Explains why `value` is not a dense tensor of `shape`, as TF Serving.

  Only called once a fast conversion failed, to name the culprit.
  """
  if not isinstance(value, list):
    if level != len(shape):
      raise errors.invalid_argument(
          f"JSON Value: {_debug_string(value)} found at incorrect level: "
          f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
    _check_leaf(value, dtype_enum)
    return
  if level >= len(shape):
    raise errors.invalid_argument(
        f"Encountered list at unexpected level: {level} expected < "
        f"{len(shape)}")
  if len(value) != shape[level]:
    raise errors.invalid_argument(
        f"Encountered list at unexpected size: {len(value)} at level: "
        f"{level} expected size: {shape[level]}")
  for item in value:
    _check_nesting(item, shape, dtype_enum, level + 1)


def _string_array(value, shape):
  """A numpy object array of bytes from nested JSON strings / b64 objects."""
  flat = []

  def walk(item):
    if isinstance(item, list):
      for x in item:
        walk(x)
    elif isinstance(item, dict):
      flat.append(_decode_base64(item))
    else:
      flat.append(item.encode("utf-8"))

  walk(value)
  array = np.empty(len(flat), dtype=object)
  array[:] = flat
  return array.reshape(shape)


def to_array(value, dtype_enum):
  """One JSON value (a nested list or a scalar) as a numpy array.

  Args:
    value: the parsed JSON value.
    dtype_enum: the signature input's `types_pb2.DataType`.

  Returns:
    A numpy array of the input's dtype (bytes objects for DT_STRING).

  Raises:
    ServingError: INVALID_ARGUMENT when the value is ragged, nested
      differently, or holds a value of another type.
  """
  shape = _dense_shape(value)
  if dtype_enum == types_pb2.DT_STRING:
    _check_nesting(value, shape, dtype_enum)
    return _string_array(value, shape)
  np_dtype = np.dtype(tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype)
  try:
    array = np.array(value)
    if array.dtype == object and np_dtype.kind == "f" and all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        for v in array.ravel()):
      # Integers of 2**64 and more: doubles, as TF Serving's parser reads
      # them.
      array = np.array(value, dtype=np.float64)
  except (ValueError, OverflowError, TypeError):
    array = None
  if array is None:
    ok = False
  elif array.size == 0:
    ok = True
  elif dtype_enum == types_pb2.DT_BOOL:
    ok = array.dtype.kind == "b"
  elif np_dtype.kind in _INT_KINDS:
    ok = array.dtype.kind in _INT_KINDS
  else:
    ok = array.dtype.kind in _FLOAT_KINDS
  if not ok or list(array.shape) != shape:
    _check_nesting(value, shape, dtype_enum)
    # Every leaf has the right type: only an out-of-range integer is left.
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(value)} does not fit in "
        f"{codec.dtype_name(dtype_enum)}")
  if np_dtype.kind in _INT_KINDS:
    info = np.iinfo(np_dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
      raise errors.invalid_argument(
          f"JSON Value: {_debug_string(value)} does not fit in "
          f"{codec.dtype_name(dtype_enum)}")
  elif array.size and array.dtype.kind == "f":
    # A finite value beyond the dtype's range would become inf: refused, as
    # TF Serving refuses it (NaN and Infinity tokens pass).
    finite = np.abs(array[np.isfinite(array)])
    if finite.size and finite.max() > float(np.finfo(np_dtype).max):
      raise errors.invalid_argument(
          f"Cannot convert JSON value: {_debug_string(float(finite.max()))} "
          f"to {codec.dtype_name(dtype_enum)} without loss of precision.")
  return array.astype(np_dtype, copy=False)


def parse_predict_request(body):
  """Reads a REST Predict body up to its inputs.

  Args:
    body: the request body (bytes or str).

  Returns:
    (document dict, signature name or "").

  Raises:
    ServingError: INVALID_ARGUMENT when the body is not a JSON object or its
      `signature_name` is not a string.
  """
  if not body:
    raise errors.invalid_argument("JSON Parse error: The document is empty")
  try:
    doc = json.loads(body, parse_float=_parse_float)
  except (ValueError, RecursionError) as e:
    raise errors.invalid_argument(f"JSON Parse error: {e}") from None
  if not isinstance(doc, dict):
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(doc)} Is not object")
  signature = doc.get("signature_name", "")
  if not isinstance(signature, str):
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(doc)} not formatted correctly. "
        "'signature_name' key must be a string value.")
  return doc, signature


def predict_inputs(doc, dtypes):
  """The request's inputs from a parsed REST Predict body.

  Args:
    doc: the parsed body (from `parse_predict_request`).
    dtypes: {input alias: `types_pb2.DataType`} of the signature.

  Returns:
    ({alias: numpy array}, `ROW` or `COLUMNAR`).

  Raises:
    ServingError: INVALID_ARGUMENT, worded as TF Serving's, when neither or
      both of "instances" and "inputs" are given or they do not match the
      signature.
  """
  has_instances = "instances" in doc
  has_inputs = "inputs" in doc
  if has_instances and has_inputs:
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(doc)} Not formatted correctly expecting "
        "only one of 'inputs' or 'instances' keys to exist ")
  if has_instances:
    return _instances(doc, dtypes), ROW
  if has_inputs:
    return _columnar(doc["inputs"], dtypes), COLUMNAR
  raise errors.invalid_argument("Missing 'inputs' or 'instances' key")


def _instances(doc, dtypes):
  instances = doc["instances"]
  if not isinstance(instances, list):
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(doc)} Expecting 'instances' to be an "
        "list/array")
  if not instances:
    raise errors.invalid_argument(
        f"JSON Value: {_debug_string(doc)} No values in 'instances' array")

  def is_object(value):
    return isinstance(value, dict) and not is_base64_object(value)

  if not is_object(instances[0]) and len(dtypes) > 1:
    raise errors.invalid_argument(
        "instances is a plain list, but expecting list of objects as multiple "
        "input tensors required as per tensorinfo_map")
  names = sorted(dtypes)
  if not is_object(instances[0]):
    (name,) = names
    for i, item in enumerate(instances):
      if is_object(item):
        raise errors.invalid_argument(
            f"Expecting value/list but got object at item {i} of input list")
    columns = {name: instances}
  else:
    columns = {name: [] for name in names}
    for i, item in enumerate(instances):
      if not is_object(item):
        raise errors.invalid_argument(
            f"Expecting object but got list at item {i} of input list")
      if sorted(item) != names:
        unknown = sorted(set(item) - set(names))
        if unknown:
          raise errors.invalid_argument(
              f"Failed to process element: {i} key: {unknown[0]} of "
              "'instances' list. Error: JSON object: does not have named "
              f"input: {unknown[0]}")
        raise errors.invalid_argument(
            f"Failed to process element: {i} of 'instances' list. JSON "
            f"object: {_debug_string(item)} keys must be equal to: "
            f"{','.join(names)}")
      for name in names:
        columns[name].append(item[name])
  arrays = {}
  for name, rows in columns.items():
    first = _dense_shape(rows[0])
    for i, row in enumerate(rows):
      if _dense_shape(row) != first:
        raise errors.invalid_argument(
            f"Failed to process element: {i} of 'instances' list. Error: "
            f"Expecting shape {first} but got: {_dense_shape(row)}")
    arrays[name] = to_array(rows, dtypes[name])
  return arrays


def _columnar(value, dtypes):
  if not isinstance(value, dict) or is_base64_object(value):
    if len(dtypes) > 1:
      raise errors.invalid_argument(
          "inputs is a plain value/list, but expecting an object as multiple "
          "input tensors required as per tensorinfo_map")
    (name,) = dtypes
    return {name: to_array(value, dtypes[name])}
  arrays = {}
  for name in sorted(dtypes):
    if name not in value:
      raise errors.invalid_argument(
          f"Missing named input: {name} in 'inputs' object.")
    arrays[name] = to_array(value[name], dtypes[name])
  return arrays


def _jsonable(array, name):
  """A numpy array as nested lists of JSON values, as TF Serving writes them.

  float32 values go through their shortest repr, so 0.2 is written "0.2"
  and not "0.20000000298023224".
  """
  if array.dtype.kind == "f":
    flat = [float(str(v)) for v in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape).tolist()
  if array.dtype.kind in "OSU":
    as_bytes = name.endswith(_BYTES_SUFFIX)

    def convert(v):
      v = v if isinstance(v, bytes) else str(v).encode("utf-8")
      if as_bytes:
        return {_BASE64_KEY: base64.b64encode(v).decode("ascii")}
      return v.decode("utf-8", errors="replace")

    flat = [convert(v) for v in array.ravel()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape).tolist()
  return array.tolist()


def predict_response(outputs, request_format):
  """The REST answer to a Predict: TF Serving's JSON for its format.

  Args:
    outputs: {output alias: numpy array}, batch first.
    request_format: `ROW` or `COLUMNAR`, as the request was written.

  Returns:
    The JSON text.

  Raises:
    ServingError: INVALID_ARGUMENT when a row-format answer has an output
      without a batch dimension or outputs of different batch sizes.
  """
  names = sorted(outputs)
  values = {name: _jsonable(np.asarray(outputs[name]), name)
            for name in names}
  if request_format == COLUMNAR:
    body = {"outputs": values[names[0]] if len(names) == 1 else values}
    return json.dumps(body, allow_nan=True)
  batch = None
  for name in names:
    array = np.asarray(outputs[name])
    if array.ndim == 0:
      raise errors.invalid_argument(
          f"Tensor name: {name} has no shape information ")
    if batch is not None and array.shape[0] != batch:
      raise errors.invalid_argument(
          f"Tensor name: {name} has inconsistent batch size: "
          f"{array.shape[0]} expecting: {batch}")
    batch = array.shape[0]
  if len(names) == 1:
    predictions = values[names[0]]
  else:
    predictions = [{name: values[name][i] for name in names}
                   for i in range(batch)]
  return json.dumps({"predictions": predictions}, allow_nan=True)


def outputs_from_response(body, request_format, dtypes):
  """Reads a REST Predict answer back into arrays (the client's side).

  Args:
    body: the response body (bytes or str).
    request_format: `ROW` or `COLUMNAR`, as the request was written.
    dtypes: {output alias: `types_pb2.DataType`} of the signature's outputs.

  Returns:
    {output alias: numpy array}.

  Raises:
    ServingError: INVALID_ARGUMENT when the answer does not match the format.
  """
  try:
    doc = json.loads(body)
  except ValueError as e:
    raise errors.invalid_argument(f"JSON Parse error: {e}") from None
  key = "outputs" if request_format == COLUMNAR else "predictions"
  if not isinstance(doc, dict) or key not in doc:
    raise errors.invalid_argument(
        f"Response {_debug_string(doc)} has no '{key}' key")
  value = doc[key]
  names = sorted(dtypes)
  if len(names) == 1:
    columns = {names[0]: value}
  elif request_format == COLUMNAR:
    columns = value
  else:
    try:
      columns = {name: [row[name] for row in value] for name in names}
    except (KeyError, TypeError):
      raise errors.invalid_argument(
          f"Response {_debug_string(doc)} does not hold the outputs "
          f"{','.join(names)} in every prediction") from None
  if not isinstance(columns, dict) or set(columns) != set(names):
    raise errors.invalid_argument(
        f"Response {_debug_string(doc)} does not hold the outputs "
        f"{','.join(names)}")
  return {name: to_array(columns[name], dtypes[name]) for name in names}
