"""A gRPC client for dual models served by TF Serving (or dropvar_model_server).

Uses only the official `tensorflow_serving.apis` stubs, so it works unchanged
against a real TF Serving (>= 2.21) and against the local development server.

Example:

```python
from dropvar_tf.serving.client import VariationClient

with VariationClient("localhost:8500", "movies") as client:
  result = client.predict({"user_id": np.array([3, 7]),
                           "movie_id": np.array([10, 11])})
  result.prediction  # (2, 1) float32
  result.variation   # (2, 1) float32, the estimated DPV
  result.model_version
```
"""

import dataclasses
import random
import time

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf import validation
from dropvar_tf._keras import tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_SIGNATURE_DEF_FIELD = "signature_def"
_STATE_NAMES = get_model_status_pb2.ModelVersionStatus.State


class ServingError(Exception):
  """A failed RPC: carries the gRPC status code and the server's message.

  Attributes:
    code: a `grpc.StatusCode`.
    details: the server's message.
    method: the RPC name ("Predict", "GetModelMetadata", "GetModelStatus").
  """

  def __init__(self, code, details, method):
    self.code = code
    self.details = details
    self.method = method
    super().__init__(f"{method} failed with {code.name}: {details}")


@dataclasses.dataclass(frozen=True)
class Result:
  """What Predict returned.

  Attributes:
    prediction: the "prediction" output, a numpy array (batch, ...), or None
      when filtered out.
    variation: the "variation" output (the estimated dropout prediction
      variation), a numpy array (batch, ...), or None when filtered out.
    model_version: the version that answered.
    outputs: every returned output, {alias: numpy array}.
  """
  prediction: object
  variation: object
  model_version: int
  outputs: dict


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """An input or output of a served signature.

  Attributes:
    name: the alias.
    dtype: a `tf.DType` (None for a signature entry without a tensor).
    shape: tuple of ints, -1 for any size; None for unknown rank.
  """
  name: str
  dtype: object
  shape: object


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
  """GetModelMetadata's answer, decoded.

  Attributes:
    model_name: the model's name.
    model_version: the version that answered.
    signature_defs: {signature name: `SignatureDef` proto}.
  """
  model_name: str
  model_version: int
  signature_defs: dict

  def inputs(self, signature=contract.SERVING_SIGNATURE):
    """{alias: TensorSpec} of a signature's inputs."""
    return _specs(self.signature_defs[signature].inputs)

  def outputs(self, signature=contract.SERVING_SIGNATURE):
    """{alias: TensorSpec} of a signature's outputs."""
    return _specs(self.signature_defs[signature].outputs)


@dataclasses.dataclass(frozen=True)
class VersionStatus:
  """One entry of GetModelStatus: version, state name ("AVAILABLE", ...),
  error code (0 when fine) and message."""
  version: int
  state: str
  error_code: int
  error_message: str


def _specs(tensor_infos):
  specs = {}
  for alias, info in tensor_infos.items():
    shape = None if info.tensor_shape.unknown_rank else tuple(
        d.size for d in info.tensor_shape.dim)
    # DT_INVALID (0) appears in `__saved_model_init_op`, which has no tensor.
    dtype = tf.dtypes.as_dtype(info.dtype) if info.dtype else None
    specs[alias] = TensorSpec(alias, dtype, shape)
  return specs


def encode(array):
  """Encodes an array-like as a TensorProto with `tensor_content`.

  One bytes copy of the array instead of one protobuf value per element (what
  `tf.make_tensor_proto` does for small arrays is the same; doing it here
  skips its per-call dtype inference and checks).

  Args:
    array: a numpy array or array-like. Strings go through
      `tf.make_tensor_proto`.

  Returns:
    A `tensorflow.TensorProto`.
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


def decode(proto):
  """Decodes a TensorProto into a numpy array.

  `tensor_content` (what dropvar_model_server sends) is read without a copy;
  per-element value fields (what TF Serving sends by default) go through
  `tf.make_ndarray`.

  Args:
    proto: a `tensorflow.TensorProto`.

  Returns:
    A numpy array; read-only when decoded from tensor_content.
  """
  if proto.tensor_content:
    dtype = tf.dtypes.as_dtype(proto.dtype)
    if dtype != tf.string:
      shape = [d.size for d in proto.tensor_shape.dim]
      np_dtype = np.dtype(dtype.as_numpy_dtype).newbyteorder("<")
      return np.frombuffer(proto.tensor_content, np_dtype).reshape(shape)
  return tf.make_ndarray(proto)


class VariationClient:
  """Queries a served dual model: prediction and variation in one call.

  Every RPC gets an explicit deadline (`timeout`). Only UNAVAILABLE (server
  not reachable yet, or restarting) is retried, with exponential backoff:
  all three RPCs are read-only, so retrying them is safe. Every other failure
  is raised at once as `ServingError` carrying the gRPC code and message.
  """

  def __init__(self, target, model_name,
               signature=contract.SERVING_SIGNATURE, version=None,
               version_label=None, timeout=10.0, max_retries=3,
               backoff_seconds=0.05, max_backoff_seconds=2.0,
               cast_inputs=True, channel=None, channel_options=None):
    """Creates the client; opens an insecure channel to `target` lazily.

    Args:
      target: "host:port" of the server.
      model_name: the served model's name.
      signature: the signature to call.
      version: a specific version to ask for (None: the latest).
      version_label: a version label instead of `version`.
      timeout: deadline of each RPC attempt, in seconds.
      max_retries: retries after UNAVAILABLE (0: none).
      backoff_seconds: first backoff; doubles each retry, randomised by up to
        half so clients do not retry in lock step.
      max_backoff_seconds: longest backoff.
      cast_inputs: cast inputs whose dtype differs from the signature's to
        the signature's dtype when numpy "same_kind" casting allows it
        (float64 -> float32, int32 -> int64). Costs one GetModelMetadata call,
        made once and cached.
      channel: a `grpc.Channel` to use instead of creating one (not closed by
        `close`).
      channel_options: extra options for the created channel.

    Raises:
      ValueError: an argument is invalid.
    """
    if not isinstance(target, str) or not target:
      raise validation.invalid("target", "a 'host:port' string", target)
    if not isinstance(model_name, str) or not model_name:
      raise validation.invalid("model_name", "a non-empty string", model_name)
    if not isinstance(signature, str):
      raise validation.invalid("signature", "a string", signature)
    if version is not None and version_label is not None:
      raise validation.invalid(
          "version_label", "None when `version` is given (pass one of them)",
          version_label)
    if version is not None:
      version = validation.check_int(version, "version", 0)
    if version_label is not None and (not isinstance(version_label, str) or
                                      not version_label):
      raise validation.invalid("version_label", "a non-empty string",
                               version_label)
    if isinstance(timeout, bool) or not isinstance(
        timeout, (int, float)) or not timeout > 0:
      raise validation.invalid("timeout", "a number of seconds > 0", timeout)
    self.max_retries = validation.check_int(max_retries, "max_retries", 0)
    self.target = target
    self.model_name = model_name
    self.signature = signature
    self.version = version
    self.version_label = version_label
    self.timeout = float(timeout)
    self.backoff_seconds = float(backoff_seconds)
    self.max_backoff_seconds = float(max_backoff_seconds)
    self.cast_inputs = cast_inputs
    self._own_channel = channel is None
    if channel is None:
      channel = grpc.insecure_channel(target, options=channel_options or [])
    self._channel = channel
    self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(
        channel)
    self._model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    self._input_specs = None

  # -- RPC plumbing.

  def _fill_model_spec(self, spec, with_signature=True):
    spec.name = self.model_name
    if with_signature:
      spec.signature_name = self.signature
    if self.version is not None:
      spec.version.value = self.version
    elif self.version_label is not None:
      spec.version_label = self.version_label

  def _call(self, method, rpc, request, timeout):
    """Calls `rpc` with a deadline, retrying UNAVAILABLE with backoff."""
    timeout = self.timeout if timeout is None else timeout
    attempt = 0
    while True:
      try:
        return rpc(request, timeout=timeout)
      except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE and attempt < self.max_retries:
          delay = min(self.max_backoff_seconds,
                      self.backoff_seconds * 2**attempt)
          time.sleep(delay * random.uniform(0.5, 1.0))
          attempt += 1
          continue
        if attempt:
          details = f"{details} (after {attempt + 1} attempts)"
        raise ServingError(code, details, method) from None

  # -- Public API.

  def build_request(self, inputs, output_filter=None):
    """The PredictRequest `predict` would send (for tests and tools).

    Args:
      inputs: see `predict`.
      output_filter: see `predict`.

    Returns:
      A `PredictRequest`.
    """
    request = predict_pb2.PredictRequest()
    self._fill_model_spec(request.model_spec)
    for alias, array in self._named_inputs(inputs).items():
      request.inputs[alias].CopyFrom(encode(array))
    if output_filter is not None:
      if isinstance(output_filter, str):
        output_filter = [output_filter]
      request.output_filter.extend(output_filter)
    return request

  def predict(self, inputs, output_filter=None, timeout=None):
    """Calls Predict.

    Args:
      inputs: a dict {input alias: array-like}, or one array-like for a
        signature with a single input (its name is learned from
        GetModelMetadata once). Arrays have the batch as first dimension.
      output_filter: output aliases to return (None: all), e.g.
        ["variation"].
      timeout: deadline in seconds for this call (default: the client's).

    Returns:
      A `Result`.

    Raises:
      ServingError: the server refused the request or could not be reached.
      ValueError: `inputs` is empty, or a single array was given for a
        signature with several inputs.
    """
    request = self.build_request(inputs, output_filter)
    response = self._call("Predict", self._predict_stub.Predict, request,
                          timeout)
    outputs = {alias: decode(t) for alias, t in response.outputs.items()}
    return Result(prediction=outputs.get(contract.PREDICTION_KEY),
                  variation=outputs.get(contract.VARIATION_KEY),
                  model_version=int(response.model_spec.version.value),
                  outputs=outputs)

  def get_model_metadata(self, timeout=None):
    """Calls GetModelMetadata (the signature_def field).

    Returns:
      A `ModelMetadata`.

    Raises:
      ServingError: on a failed RPC.
    """
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    self._fill_model_spec(request.model_spec, with_signature=False)
    request.metadata_field.append(_SIGNATURE_DEF_FIELD)
    response = self._call("GetModelMetadata",
                          self._predict_stub.GetModelMetadata, request,
                          timeout)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[_SIGNATURE_DEF_FIELD].Unpack(signature_map)
    return ModelMetadata(model_name=response.model_spec.name,
                         model_version=int(response.model_spec.version.value),
                         signature_defs=dict(signature_map.signature_def))

  def get_model_status(self, timeout=None):
    """Calls GetModelStatus for the client's model (and version, if set).

    Returns:
      A list of `VersionStatus`, one per version the server knows.

    Raises:
      ServingError: on a failed RPC (NOT_FOUND for an unknown model).
    """
    request = get_model_status_pb2.GetModelStatusRequest()
    self._fill_model_spec(request.model_spec, with_signature=False)
    response = self._call("GetModelStatus", self._model_stub.GetModelStatus,
                          request, timeout)
    return [
        VersionStatus(version=int(s.version),
                      state=_STATE_NAMES.Name(s.state),
                      error_code=int(s.status.error_code),
                      error_message=s.status.error_message)
        for s in response.model_version_status
    ]

  def input_specs(self):
    """{alias: TensorSpec} of the client's signature, fetched once."""
    if self._input_specs is None:
      metadata = self.get_model_metadata()
      if self.signature not in metadata.signature_defs:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Serving signature key \"{self.signature}\" not found.",
            "GetModelMetadata")
      self._input_specs = metadata.inputs(self.signature)
    return self._input_specs

  def _named_inputs(self, inputs):
    """{alias: numpy array}, names filled in and dtypes cast if asked."""
    if isinstance(inputs, dict):
      if not inputs:
        raise validation.invalid("inputs", "a non-empty dict or an array",
                                 inputs)
      named = {str(k): np.asarray(v) for k, v in inputs.items()}
    else:
      specs = self.input_specs()
      if len(specs) != 1:
        raise validation.invalid(
            "inputs", f"a dict with the keys {sorted(specs)} (signature "
            f"{self.signature!r} has {len(specs)} inputs)",
            type(inputs).__name__)
      named = {next(iter(specs)): np.asarray(inputs)}
    if self.cast_inputs:
      specs = self.input_specs()
      for alias, array in named.items():
        spec = specs.get(alias)
        if spec is None or spec.dtype is None or array.dtype.kind in "OUS":
          continue
        want = np.dtype(spec.dtype.as_numpy_dtype)
        if array.dtype == want or not np.can_cast(array.dtype, want,
                                                  casting="same_kind"):
          continue
        if want.kind in "iu" and array.size:
          # Never wrap integers around silently; the server names the dtype.
          info = np.iinfo(want)
          if array.min() < info.min or array.max() > info.max:
            continue
        named[alias] = array.astype(want)
    return named

  def close(self):
    """Closes the channel (if the client created it)."""
    if self._own_channel:
      self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
