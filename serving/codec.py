"""The tensor codec of both ends: numpy arrays <-> `tensorflow.TensorProto`.

`encode` writes `tensor_content` (one bytes copy of the array); `decode`
reads either `tensor_content` or the typed value fields (`float_val`, ...)
that TF Serving and `tf.make_tensor_proto` write, and checks the proto before
it trusts it: dtype, rank, dimensions, byte length and value count. The
server decodes request inputs with a size limit; the client decodes response
outputs without one.
"""

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.serving import errors
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2

# The typed value fields of a TensorProto (all but tensor_content).
_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val",
                 "string_val", "int64_val", "bool_val", "uint32_val",
                 "uint64_val")


def dtype_name(enum):
  """'float32' for DT_FLOAT, as TF error messages name dtypes.

  Args:
    enum: a `types_pb2.DataType` value.

  Returns:
    The dtype's name, or "unknown dtype N" for an enum TF does not know.
  """
  try:
    return tf.dtypes.as_dtype(enum).name
  except TypeError:
    return f"unknown dtype {enum}"


def shape_string(dims):
  """'[-1,4]' for (-1, 4), the way error messages print shapes."""
  return "[" + ",".join(str(d) for d in dims) + "]"


def encode(array):
  """Encodes an array-like as a TensorProto with `tensor_content`.

  `tensor_content` is one bytes copy of the array; per-element value lists
  cost a protobuf value per element, and `tf.make_tensor_proto` would infer
  and check the dtype on every call.

  Args:
    array: a numpy array or array-like (any numeric or bool dtype; strings go
      through `tf.make_tensor_proto`).

  Returns:
    A `tensorflow.TensorProto` in TF's little-endian byte order.
  """
  array = np.asarray(array)
  if array.dtype.kind in "OUS":
    return tf.make_tensor_proto(array)
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  return tensor_pb2.TensorProto(
      dtype=tf.dtypes.as_dtype(array.dtype).as_datatype_enum,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
               for d in array.shape]),
      tensor_content=np.ascontiguousarray(array).tobytes())


def decode(proto, name, max_bytes=None, role="Input"):
  """Decodes a TensorProto into a numpy array, checking it first.

  `tensor_content` is read without a copy (the array is then read-only);
  typed value fields go through `tf.make_ndarray`. Fewer typed values than
  elements follows TF: the last value is repeated (zeros when none is given).

  Args:
    proto: a `tensorflow.TensorProto`.
    name: the tensor's alias, named in error messages.
    max_bytes: the most bytes the decoded array may take; None for no limit.
    role: how error messages name the tensor ("Input", "Output").

  Returns:
    A numpy array with the proto's dtype and shape.

  Raises:
    ServingError: INVALID_ARGUMENT naming the tensor when the proto cannot be
      decoded: unknown or unsupported dtype, unknown rank, negative
      dimension, more than `max_bytes`, tensor_content of the wrong byte
      length, or more typed values than the shape holds.
  """
  label = f"{role} \"{name}\""
  try:
    dtype = tf.dtypes.as_dtype(proto.dtype)
  except TypeError:
    raise errors.invalid_argument(
        f"{label} has an unknown dtype enum {proto.dtype}.") from None
  # A reference dtype (DT_FLOAT_REF, ...) is not its own base dtype.
  if proto.dtype == types_pb2.DT_INVALID or dtype.is_quantized or (
      dtype.base_dtype != dtype or dtype == tf.resource or
      dtype == tf.variant):
    raise errors.invalid_argument(
        f"{label} has an unsupported dtype {dtype.name}.")
  dims = claimed_dims(proto, name, role)
  num_elements = 1
  for d in dims:
    num_elements *= d
  is_string = dtype == tf.string
  itemsize = 1 if is_string else np.dtype(dtype.as_numpy_dtype).itemsize
  if max_bytes is not None and num_elements * itemsize > max_bytes:
    raise errors.invalid_argument(
        f"{label} with shape {shape_string(dims)} would take "
        f"{num_elements * itemsize} bytes, more than the {max_bytes} allowed "
        "(--max_request_bytes).")
  if proto.tensor_content:
    if is_string:
      raise errors.invalid_argument(
          f"{label}: tensor_content is not valid for string tensors; use "
          "string_val.")
    content = proto.tensor_content
    if len(content) % itemsize:
      raise errors.invalid_argument(
          f"{label}: tensor_content has {len(content)} bytes, not a multiple "
          f"of {itemsize} (the size of {dtype.name}).")
    if len(content) // itemsize != num_elements:
      raise errors.invalid_argument(
          f"{label}: tensor_content holds {len(content) // itemsize} "
          f"{dtype.name} values but shape {shape_string(dims)} needs "
          f"{num_elements}.")
    # TF writes tensor_content in little-endian byte order.
    np_dtype = np.dtype(dtype.as_numpy_dtype).newbyteorder("<")
    return np.frombuffer(content, dtype=np_dtype).reshape(dims)
  num_values = _num_typed_values(proto)
  if num_values > num_elements:
    raise errors.invalid_argument(
        f"{label} holds {num_values} values but shape {shape_string(dims)} "
        f"needs {num_elements}.")
  try:
    return tf.make_ndarray(proto)
  except Exception as e:
    raise errors.invalid_argument(
        f"{label} could not be decoded: {e}") from None


def claimed_dims(proto, name, role="Input"):
  """The shape a TensorProto claims, read without decoding any value.

  A request can claim a huge shape with a single value (typed values are
  repeated to fill it), so limits are checked on this before decoding.

  Args:
    proto: a `tensorflow.TensorProto`.
    name: the tensor's alias, named in error messages.
    role: how error messages name the tensor ("Input", "Output").

  Returns:
    The list of dimension sizes.

  Raises:
    ServingError: INVALID_ARGUMENT for an unknown rank or a negative
      dimension.
  """
  label = f"{role} \"{name}\""
  if proto.tensor_shape.unknown_rank:
    raise errors.invalid_argument(f"{label} has an unknown rank; send a "
                                  "shape.")
  dims = [d.size for d in proto.tensor_shape.dim]
  if any(d < 0 for d in dims):
    raise errors.invalid_argument(
        f"{label} has a negative dimension in shape {shape_string(dims)}.")
  return dims


def _num_typed_values(proto):
  """Number of values in the typed (non tensor_content) fields of `proto`."""
  total = sum(len(getattr(proto, f)) for f in _VALUE_FIELDS)
  # Complex numbers use two entries per value.
  total += (len(proto.scomplex_val) + len(proto.dcomplex_val)) // 2
  return total
