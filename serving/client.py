"""A client for dual models served by TF Serving (or dropvar_model_server).

Uses only the official `tensorflow_serving.apis` stubs, so it works unchanged
against a real TF Serving (>= 2.21) and against the local development server.
With `protocol="rest"` it speaks TF Serving's REST API instead of gRPC
(`rest_client.RestStub`), with the same messages and errors.

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

A dual of a multi-output model answers "prediction/<output name>" and
"variation/<output name>" (`contract.OUTPUT_SEPARATOR`): `result.predictions`
and `result.variations` hold them by output name. A dual exported with
`add_variation_head(out_of_range=True)` also answers "out_of_range":
`result.out_of_range`, (batch,), how far each input lies outside what the
head was calibrated on (serving/README.md says how to use it).
"""

import dataclasses
import json

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf import saved_model
from dropvar_tf import validation
from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from dropvar_tf.serving import rest_client
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_SIGNATURE_DEF_FIELD = "signature_def"
_STATE_NAMES = get_model_status_pb2.ModelVersionStatus.State

# The services the client calls; the retry policy covers all their methods.
_SERVICES = ("tensorflow.serving.PredictionService",
             "tensorflow.serving.ModelService")
# gRPC clamps a retry policy's maxAttempts to 5.
_MAX_RETRIES = 4
# gRPC retries only requests it still holds; its default per-call buffer is
# 256 KiB. This covers requests up to the local server's default size limit.
_RETRY_BUFFER_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Result:
  """What Predict returned.

  Attributes:
    prediction: the "prediction" output, a numpy array (batch, ...), or None
      when filtered out.
    variation: the "variation" output (the estimated dropout prediction
      variation), a numpy array (batch, ...), or None when filtered out.
    model_version: the version that answered (None over REST, whose answer
      names no version, unless the request named one).
    outputs: every returned output, {alias: numpy array}.
    out_of_range: the "out_of_range" output (batch,), or None when the
      model has none or it was filtered out.
  """
  prediction: object
  variation: object
  model_version: int | None
  outputs: dict
  out_of_range: object = None

  @property
  def predictions(self):
    """{output name: prediction} of a multi-output dual; {} otherwise."""
    return contract.per_output(self.outputs, contract.PREDICTION_KEY)

  @property
  def variations(self):
    """{output name: variation} of a multi-output dual; {} otherwise."""
    return contract.per_output(self.outputs, contract.VARIATION_KEY)


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


def decode_outputs(response):
  """Decodes the outputs of a PredictResponse.

  Args:
    response: a `PredictResponse`.

  Returns:
    {alias: numpy array}; arrays decoded from tensor_content are read-only.

  Raises:
    ServingError: INVALID_ARGUMENT naming an output that cannot be decoded.
  """
  return {alias: codec.decode(proto, alias, role="Output")
          for alias, proto in response.outputs.items()}


def _duration(seconds):
  """A service config duration: "0.050000000s"."""
  return f"{seconds:.9f}s"


def _service_config(max_retries, backoff_seconds, max_backoff_seconds):
  """The channel's service config: retry UNAVAILABLE on every method."""
  method_config = {"name": [{"service": s} for s in _SERVICES]}
  if max_retries:
    method_config["retryPolicy"] = {
        "maxAttempts": max_retries + 1,
        "initialBackoff": _duration(backoff_seconds),
        "maxBackoff": _duration(max_backoff_seconds),
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
  return {"methodConfig": [method_config]}


class VariationClient:
  """Queries a served dual model: prediction and variation in one call.

  Every RPC gets an explicit deadline (`timeout`). Retries are left to gRPC:
  the channel's service config holds a `retryPolicy` that retries only
  UNAVAILABLE (server not reachable yet, or restarting), up to `max_retries`
  times with exponential backoff. All three RPCs are read-only, so retrying
  them is safe. Every other failure is raised at once as `ServingError`
  carrying the gRPC code and the server's message.
  """

  def __init__(self, target, model_name,
               signature=contract.SERVING_SIGNATURE, version=None,
               version_label=None, timeout=10.0, max_retries=3,
               backoff_seconds=0.05, max_backoff_seconds=2.0,
               cast_inputs=True, channel=None, channel_options=None,
               protocol="grpc"):
    """Creates the client; opens an insecure channel to `target` lazily.

    Args:
      target: "host:port" of the server (its REST port for "rest").
      model_name: the served model's name.
      signature: the signature to call.
      version: a specific version to ask for (None: the latest).
      version_label: a version label instead of `version`.
      timeout: deadline of each call, in seconds; it covers the call's
        retries too.
      max_retries: retries after UNAVAILABLE, 0 to 4 (gRPC makes at most 5
        attempts). Set as the channel's `retryPolicy`: maxAttempts
        `max_retries + 1`, retryableStatusCodes ["UNAVAILABLE"]. gRPC retries
        a request only while it holds a copy of it; the created channel
        keeps up to 64 MiB per call for that.
      backoff_seconds: the retryPolicy's initialBackoff, > 0. The n-th retry
        waits min(backoff_seconds * 2**(n-1), max_backoff_seconds),
        randomised by gRPC so that clients do not retry in lock step.
      max_backoff_seconds: the retryPolicy's maxBackoff, > 0.
      cast_inputs: cast inputs whose dtype differs from the signature's to
        the signature's dtype when numpy "same_kind" casting allows it
        (float64 -> float32, int32 -> int64). Costs one GetModelMetadata call,
        made once and cached.
      channel: a `grpc.Channel` to use instead of creating one (not closed by
        `close`). Its own service config decides retries: `max_retries` and
        the backoffs apply to a created channel only.
      channel_options: extra options for the created channel.
      protocol: "grpc", or "rest" for TF Serving's REST API. Over REST
        `max_retries` and the backoffs retry refused connections, a Predict
        result has `model_version` None unless `version` is set (TF
        Serving's REST answer names no version), and `channel` cannot be
        given.

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
    if protocol not in ("grpc", "rest"):
      raise validation.invalid("protocol", "'grpc' or 'rest'", protocol)
    if protocol == "rest" and channel is not None:
      raise validation.invalid("channel", "None with protocol='rest'",
                               channel)
    self.max_retries = validation.check_int(max_retries, "max_retries", 0)
    if self.max_retries > _MAX_RETRIES:
      raise validation.invalid(
          "max_retries", f"an integer in [0, {_MAX_RETRIES}] (gRPC makes at "
          f"most {_MAX_RETRIES + 1} attempts)", max_retries)
    for arg, value in (("backoff_seconds", backoff_seconds),
                       ("max_backoff_seconds", max_backoff_seconds)):
      if isinstance(value, bool) or not isinstance(
          value, (int, float)) or not value > 0:
        raise validation.invalid(arg, "a number of seconds > 0", value)
    self.target = target
    self.model_name = model_name
    self.signature = signature
    self.version = version
    self.version_label = version_label
    self.timeout = float(timeout)
    self.backoff_seconds = float(backoff_seconds)
    self.max_backoff_seconds = float(max_backoff_seconds)
    self.cast_inputs = cast_inputs
    self.protocol = protocol
    self._input_specs = None
    self._own_channel = channel is None
    if protocol == "rest":
      self._channel = rest_client.RestStub(
          target, self.max_retries, self.backoff_seconds,
          self.max_backoff_seconds)
      self._predict_stub = self._model_stub = self._channel
      return
    if channel is None:
      service_config = _service_config(self.max_retries,
                                       self.backoff_seconds,
                                       self.max_backoff_seconds)
      options = [("grpc.enable_retries", 1),
                 ("grpc.service_config", json.dumps(service_config)),
                 ("grpc.per_rpc_retry_buffer_size", _RETRY_BUFFER_BYTES)]
      channel = grpc.insecure_channel(
          target, options=options + list(channel_options or []))
    self._channel = channel
    self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(
        channel)
    self._model_stub = model_service_pb2_grpc.ModelServiceStub(channel)

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
    """Calls `rpc` with a deadline; a failure becomes a `ServingError`."""
    timeout = self.timeout if timeout is None else timeout
    try:
      return rpc(request, timeout=timeout)
    except grpc.RpcError as e:
      raise errors.ServingError.from_rpc_error(e, method) from None

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
      request.inputs[alias].CopyFrom(codec.encode(array))
    if output_filter is not None:
      if isinstance(output_filter, str):
        output_filter = [output_filter]
      request.output_filter.extend(output_filter)
    return request

  def predict_response(self, inputs, output_filter=None, timeout=None):
    """Calls Predict and returns the response as it came.

    Args:
      inputs: see `predict`.
      output_filter: see `predict`.
      timeout: see `predict`.

    Returns:
      The `PredictResponse` (see `decode_outputs`).

    Raises:
      ServingError: the server refused the request or could not be reached.
      ValueError: see `predict`.
    """
    request = self.build_request(inputs, output_filter)
    return self._call("Predict", self._predict_stub.Predict, request,
                      timeout)

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
      ServingError: the server refused the request or could not be reached,
        or an output could not be decoded (INVALID_ARGUMENT naming it).
      ValueError: `inputs` is empty, or a single array was given for a
        signature with several inputs.
    """
    response = self.predict_response(inputs, output_filter, timeout)
    outputs = decode_outputs(response)
    return Result(prediction=outputs.get(contract.PREDICTION_KEY),
                  variation=outputs.get(contract.VARIATION_KEY),
                  model_version=(int(response.model_spec.version.value)
                                 if response.model_spec.HasField("version")
                                 else None),
                  outputs=outputs,
                  out_of_range=outputs.get(contract.OUT_OF_RANGE_KEY))

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

  def export_metadata(self, timeout=None):
    """The metadata `export_saved_model` wrote into the served version.

    Runs the export's "metadata" signature (no inputs; one scalar string,
    the JSON of `assets/dropvar_tf_metadata.json`) through Predict, so it
    works over gRPC and REST, against TF Serving too.

    Args:
      timeout: deadline in seconds (default: the client's).

    Returns:
      The metadata dict (see `saved_model.read_export_metadata`), with the
      head's "fit_report"; None when the served model has no "metadata"
      signature (it was not written by `export_saved_model`).

    Raises:
      ServingError: on a failed call, or a "metadata" output that is not
        one JSON string (INVALID_ARGUMENT).
    """
    request = predict_pb2.PredictRequest()
    self._fill_model_spec(request.model_spec, with_signature=False)
    request.model_spec.signature_name = saved_model.METADATA_SIGNATURE
    try:
      response = self._call("Predict", self._predict_stub.Predict, request,
                            timeout)
    except errors.ServingError as e:
      if e.code == grpc.StatusCode.FAILED_PRECONDITION:
        return None
      raise
    value = decode_outputs(response).get(saved_model.METADATA_OUTPUT_KEY)
    try:
      text = np.asarray(value).item()
      return json.loads(text.decode("utf-8") if isinstance(text, bytes)
                        else text)
    except (TypeError, ValueError, AttributeError) as e:
      raise errors.ServingError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f"Output \"{saved_model.METADATA_OUTPUT_KEY}\" of signature "
          f"\"{saved_model.METADATA_SIGNATURE}\" is not one JSON string: "
          f"{e}", "Predict") from None

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
        raise errors.ServingError(
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
    """Closes the channel or HTTP session (if the client created it)."""
    if self._own_channel:
      self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
