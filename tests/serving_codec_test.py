"""Tests of serving/codec.py: the one TensorProto codec of client and server."""

import grpc
import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2

_MAX_BYTES = 1024

# (case, proto, expected message) for protos `decode` refuses; the protos are
# built by `_tensor` from (dtype, dims, content, unknown_rank).
_REFUSED = [
    ("unknown dtype enum", (999, [1, 4], None, False),
     "Input \"x\" has an unknown dtype enum 999."),
    ("invalid dtype", (types_pb2.DT_INVALID, [1], None, False),
     "Input \"x\" has an unknown dtype enum 0."),
    ("quantized dtype", (types_pb2.DT_QINT8, [1], None, False),
     "Input \"x\" has an unsupported dtype qint8."),
    ("reference dtype", (types_pb2.DT_FLOAT_REF, [1], None, False),
     "Input \"x\" has an unsupported dtype float32_ref."),
    ("resource dtype", (types_pb2.DT_RESOURCE, [1], None, False),
     "Input \"x\" has an unsupported dtype resource."),
    ("unknown rank", (types_pb2.DT_FLOAT, [], None, True),
     "Input \"x\" has an unknown rank; send a shape."),
    ("negative dimension", (types_pb2.DT_FLOAT, [-1, 4], None, False),
     "Input \"x\" has a negative dimension in shape [-1,4]."),
    ("too large", (types_pb2.DT_FLOAT, [100, 4], None, False),
     "Input \"x\" with shape [100,4] would take 1600 bytes, more than the "
     "1024 allowed (--max_request_bytes)."),
    ("string tensor_content", (types_pb2.DT_STRING, [2], b"ab", False),
     "Input \"x\": tensor_content is not valid for string tensors; use "
     "string_val."),
    ("byte count not a multiple", (types_pb2.DT_FLOAT, [1, 4], b"\x01" * 7,
                                   False),
     "Input \"x\": tensor_content has 7 bytes, not a multiple of 4 (the size "
     "of float32)."),
    ("content does not fill the shape", (types_pb2.DT_FLOAT, [2, 4],
                                         b"\x00" * 12, False),
     "Input \"x\": tensor_content holds 3 float32 values but shape [2,4] "
     "needs 8."),
]


def _tensor(dtype, dims=(), content=None, unknown_rank=False):
  """A TensorProto built by hand, so malformed ones can be made too."""
  proto = tensor_pb2.TensorProto(dtype=dtype)
  if unknown_rank:
    proto.tensor_shape.unknown_rank = True
  for d in dims:
    proto.tensor_shape.dim.add(size=d)
  if content is not None:
    proto.tensor_content = content
  return proto


class CodecTest(tf.test.TestCase):

  def test_encode_uses_tensor_content(self):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto = codec.encode(array)
    self.assertLen(proto.tensor_content, array.nbytes)
    self.assertEmpty(proto.float_val)
    self.assertAllEqual(tf.make_ndarray(proto), array)
    decoded = codec.decode(proto, "x")
    self.assertAllEqual(decoded, array)
    self.assertEqual(decoded.dtype, np.float32)

  def test_typed_values_decode_like_tf(self):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    typed = codec.encode(array)
    typed.ClearField("tensor_content")
    typed.float_val.extend(array.ravel().tolist())
    self.assertAllEqual(codec.decode(typed, "x"), tf.make_ndarray(typed))
    # Fewer values than elements: TF repeats the last one.
    short = _tensor(types_pb2.DT_INT64, [2, 2])
    short.int64_val.extend([1, 2])
    self.assertAllEqual(codec.decode(short, "x"), [[1, 2], [2, 2]])

  def test_big_endian_arrays_round_trip(self):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = codec.encode(array.astype(">f4"))
    self.assertEqual(proto.tensor_content, array.tobytes())
    self.assertAllEqual(codec.decode(proto, "x"), array)

  def test_round_trip_keeps_dtype_and_shape(self):
    for array in (np.array([[1, -2]], np.int64), np.array([True, False]),
                  np.zeros((2, 0, 3), np.float64),
                  np.array(3.5, np.float16)):
      with self.subTest(str(array.dtype)):
        decoded = codec.decode(codec.encode(array), "x")
        self.assertEqual(decoded.dtype, array.dtype)
        self.assertAllEqual(decoded, array)

  def test_strings_use_string_val(self):
    proto = codec.encode(np.array([b"a", b"bc"]))
    self.assertEmpty(proto.tensor_content)
    self.assertAllEqual(codec.decode(proto, "x"), [b"a", b"bc"])

  def test_malformed_protos_are_invalid_argument(self):
    for name, args, message in _REFUSED:
      with self.subTest(name):
        with self.assertRaises(errors.ServingError) as cm:
          codec.decode(_tensor(*args), "x", max_bytes=_MAX_BYTES)
        self.assertEqual(cm.exception.code,
                         grpc.StatusCode.INVALID_ARGUMENT)
        self.assertStartsWith(cm.exception.message, message)

  def test_too_many_typed_values(self):
    proto = _tensor(types_pb2.DT_FLOAT, [2, 4])
    proto.float_val.extend([1.0] * 9)
    with self.assertRaisesRegex(
        errors.ServingError,
        "^Input \"x\" holds 9 values but shape \\[2,4\\] needs 8.$"):
      codec.decode(proto, "x")

  def test_no_size_limit_without_max_bytes(self):
    array = np.zeros((100, 4), np.float32)
    self.assertAllEqual(codec.decode(codec.encode(array), "x"), array)

  def test_role_names_the_tensor(self):
    with self.assertRaisesRegex(errors.ServingError,
                                "^Output \"variation\" has an unknown rank"):
      codec.decode(_tensor(types_pb2.DT_FLOAT, unknown_rank=True),
                   "variation", role="Output")

  def test_dtype_name_and_shape_string(self):
    self.assertEqual(codec.dtype_name(types_pb2.DT_FLOAT), "float32")
    self.assertEqual(codec.dtype_name(999), "unknown dtype 999")
    self.assertEqual(codec.shape_string((-1, 4)), "[-1,4]")
    self.assertEqual(codec.shape_string(()), "[]")


if __name__ == "__main__":
  tf.test.main()
