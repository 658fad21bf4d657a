"""The request handlers, and the gRPC servicers over them.

`ServingCore` answers Predict, GetModelMetadata and GetModelStatus with the
official `tensorflow_serving.apis` messages and TF Serving's status codes
and messages (see `dropvar_tf.serving.server` for the list, and where this
server is stricter); the gRPC servicers (`PredictionServicer`,
`ModelServicer`) and the REST API (`rest.py`) both call it. Request inputs
are checked against the signature, their claimed shapes before any value is
decoded, before the model runs. A failure is answered as `status_of` says: a
`ServingError` with its code and message, a TF `OpError` with its own code,
any other exception as INTERNAL; the server keeps running.
"""

import time

from absl import logging
import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_SIGNATURE_DEF_FIELD = "signature_def"

# gRPC codes for the codes of `tf.errors.OpError` (same numbering).
_TF_TO_GRPC = {code.value[0]: code for code in grpc.StatusCode}


def _check_inputs(request_inputs, specs, options):
  """Decodes and validates the request inputs against a signature.

  Args:
    request_inputs: the request's {alias: TensorProto}.
    specs: the signature's {alias: `bundle.InputSpec`}.
    options: the server's `ServerOptions` (limits).

  Returns:
    {alias: numpy array}.

  Raises:
    ServingError: INVALID_ARGUMENT naming the offending input.
  """
  if set(request_inputs) != set(specs):
    sent = sorted(request_inputs)
    expected = sorted(specs)
    extra = sorted(set(sent) - set(expected))
    missing = sorted(set(expected) - set(sent))
    # TF Serving's wording, so clients can match either server.
    raise errors.invalid_argument(
        f"input size does not match signature: {len(sent)}!={len(expected)} "
        f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). "
        f"Sent extra: {{{','.join(extra)}}}. Missing but required: "
        f"{{{','.join(missing)}}}.")
  arrays = {}
  batch = None
  for alias in sorted(specs):
    spec = specs[alias]
    proto = request_inputs[alias]
    if proto.dtype != spec.dtype:
      raise errors.invalid_argument(
          f"Input \"{alias}\" expects dtype {codec.dtype_name(spec.dtype)} "
          f"but {codec.dtype_name(proto.dtype)} was sent.")
    # The claimed shape is checked before decoding: a single typed value
    # may claim a million rows, which decoding would expand in memory.
    dims = codec.claimed_dims(proto, alias)
    if spec.dims is not None:
      if len(dims) != len(spec.dims):
        raise errors.invalid_argument(
            f"Input \"{alias}\" expects rank {len(spec.dims)} (shape "
            f"{codec.shape_string(spec.dims)}) but got rank {len(dims)} "
            f"(shape {codec.shape_string(dims)}).")
      for axis, (want, got) in enumerate(zip(spec.dims, dims)):
        if want >= 0 and want != got:
          raise errors.invalid_argument(
              f"Input \"{alias}\" expects shape "
              f"{codec.shape_string(spec.dims)} but got "
              f"{codec.shape_string(dims)} (dimension {axis} is "
              f"{got}, expected {want}).")
      if spec.dims and spec.dims[0] < 0:
        size = dims[0]
        if size == 0:
          raise errors.invalid_argument(
              f"Input \"{alias}\" has an empty batch (batch size 0); send at "
              "least one example.")
        if size > options.max_batch_size:
          raise errors.invalid_argument(
              f"Input \"{alias}\" has batch size {size}, larger than the "
              f"maximum batch size {options.max_batch_size} "
              "(--max_batch_size).")
        if batch is None:
          batch = (alias, size)
        elif size != batch[1]:
          raise errors.invalid_argument(
              f"Input \"{alias}\" has batch size {size} but input "
              f"\"{batch[0]}\" has {batch[1]}; all inputs must have the same "
              "0th-dimension size.")
    array = codec.decode(proto, alias, options.max_request_bytes)
    if (options.reject_non_finite and array.dtype.kind in "fc" and
        not np.all(np.isfinite(array))):
      raise errors.invalid_argument(
          f"Input \"{alias}\" contains NaN or Inf values "
          "(--reject_non_finite).")
    arrays[alias] = array
  return arrays


def _output_aliases(output_filter, signature_def):
  """The output aliases to return, validated like TF Serving.

  Args:
    output_filter: the request's output_filter (empty: every output).
    signature_def: the signature's `SignatureDef`.

  Returns:
    A list of output aliases.

  Raises:
    ServingError: INVALID_ARGUMENT for an unknown or repeated alias, or one
      that names an operation (the "NoOp" of `__saved_model_init_op`), which
      has no value to return.
  """
  if not output_filter:
    aliases = list(signature_def.outputs)
  else:
    seen = set()
    for alias in output_filter:
      if alias not in signature_def.outputs:
        raise errors.invalid_argument(
            f"output tensor alias not found in signature: {alias} Outputs "
            "expected to be in the set "
            f"{{{','.join(sorted(signature_def.outputs))}}}.")
      if alias in seen:
        raise errors.invalid_argument(
            f"duplicate output tensor alias: {alias}")
      seen.add(alias)
    aliases = list(output_filter)
  for alias in aliases:
    info = signature_def.outputs[alias]
    name = info.name
    if info.WhichOneof("encoding") == "name" and ":" not in name:
      raise errors.invalid_argument(
          f"Output {alias} names the operation {name}, not a tensor: it has "
          "no value to return (an initialization signature cannot be "
          "predicted with).")
  return aliases


def status_of(error):
  """The gRPC status code and message an exception is answered with.

  Args:
    error: an exception raised while handling a request.

  Returns:
    (grpc.StatusCode, message): a `ServingError`'s own, a TF `OpError`'s
    code and message, INTERNAL with the exception's type and text otherwise.
  """
  if isinstance(error, errors.ServingError):
    return error.code, error.message
  if isinstance(error, tf.errors.OpError):
    return (_TF_TO_GRPC.get(error.error_code, grpc.StatusCode.INTERNAL),
            error.message)
  return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def _abort(context, code, message):
  # Raises; called from `except` clauses so it is not caught again.
  context.abort(code, message)


def _handle(method_name):
  """Wraps a servicer method: a failure is answered with `status_of` it."""

  def decorator(fn):

    def wrapper(self, request, context):
      try:
        return fn(self, request, context)
      except Exception as e:
        code, message = status_of(e)
        if code == grpc.StatusCode.INTERNAL and not isinstance(
            e, (errors.ServingError, tf.errors.OpError)):
          logging.exception("%s failed", method_name)
          message = f"{method_name} failed: {message}"
        _abort(context, code, message)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper

  return decorator


def _require_model_spec(request):
  """The request's ModelSpec; INVALID_ARGUMENT when it has none."""
  if not request.HasField("model_spec"):
    raise errors.invalid_argument("Missing ModelSpec")
  return request.model_spec


def _run_signature(version, signature_name, fn, arrays):
  """Runs a signature on checked inputs: {alias: numpy array}."""
  del version, signature_name  # Only a batcher needs them.
  return {alias: np.asarray(value) for alias, value in fn(**arrays).items()}


class ServingCore:
  """The request handlers behind every API: gRPC and REST answer alike.

  Each method takes and returns the official `tensorflow_serving.apis`
  messages and raises `ServingError` (or TF's `OpError`) for a refused
  request; `status_of` says how a failure is answered.
  """

  def __init__(self, manager, options, run=None, metrics=None):
    """Creates the handlers.

    Args:
      manager: the `versions.ModelManager` whose models are served.
      options: the server's `ServerOptions` (request limits).
      run: `run(version, signature_name, fn, arrays)` returning {alias:
        numpy array}; None runs each request on its own (a batcher merges
        concurrent ones).
      metrics: a `monitoring.Metrics` told about every Predict, or None.
    """
    self.manager = manager
    self.options = options
    self._run = run or _run_signature
    self._metrics = metrics

  def signature_inputs(self, model_spec):
    """The input specs of the signature a ModelSpec names.

    Args:
      model_spec: a `tensorflow.serving.ModelSpec`.

    Returns:
      {alias: `bundle.InputSpec`}.

    Raises:
      ServingError: the model, version or signature is not served.
    """
    version = self.manager.get(model_spec).resolve(model_spec)
    name = model_spec.signature_name or contract.SERVING_SIGNATURE
    _, specs, _ = version.signature(name)
    return specs

  def predict(self, request):
    """Answers a PredictRequest.

    Args:
      request: a `PredictRequest`.

    Returns:
      A `PredictResponse`.

    Raises:
      ServingError: the request is refused (see the module docstring).
      tf.errors.OpError: the model failed on the inputs.
    """
    model_spec = _require_model_spec(request)
    signature_name = model_spec.signature_name or contract.SERVING_SIGNATURE
    with self.manager.get(model_spec).use(model_spec) as version:
      fn, specs, signature_def = version.signature(signature_name)
      arrays = _check_inputs(request.inputs, specs, self.options)
      aliases = _output_aliases(request.output_filter, signature_def)
      outputs = self._run(version, signature_name, fn, arrays)
    if self._metrics is not None:
      self._metrics.observe_outputs(model_spec.name, version.version,
                                    outputs)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_spec.name
    response.model_spec.version.value = version.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
      response.outputs[alias].CopyFrom(codec.encode(outputs[alias]))
    return response

  def get_model_metadata(self, request):
    """Answers a GetModelMetadataRequest (the signature_def field).

    Args:
      request: a `GetModelMetadataRequest`.

    Returns:
      A `GetModelMetadataResponse`.

    Raises:
      ServingError: the request is refused.
    """
    model_spec = _require_model_spec(request)
    if not request.metadata_field:
      raise errors.invalid_argument(
          "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
      if field != _SIGNATURE_DEF_FIELD:
        raise errors.invalid_argument(
            f"Metadata field {field} is not supported")
    version = self.manager.get(model_spec).resolve(model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in version.signature_defs.items():
      signature_map.signature_def[name].CopyFrom(sig)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model_spec.name
    response.model_spec.version.value = version.version
    response.metadata[_SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response

  def get_model_status(self, request):
    """Answers a GetModelStatusRequest.

    Args:
      request: a `GetModelStatusRequest`.

    Returns:
      A `GetModelStatusResponse`.

    Raises:
      ServingError: the model or version is unknown.
    """
    model_spec = _require_model_spec(request)
    model = self.manager.models.get(model_spec.name)
    if model is None:
      raise errors.ServingError(
          grpc.StatusCode.NOT_FOUND,
          f"Could not find any versions of model {model_spec.name}")
    choice = model_spec.WhichOneof("version_choice")
    version = None
    if choice == "version":
      version = model_spec.version.value
    elif choice == "version_label":
      if model_spec.version_label not in model.labels:
        raise errors.invalid_argument(
            "Unrecognized servable version label: "
            f"{model_spec.version_label}")
      version = model.labels[model_spec.version_label]
    response = get_model_status_pb2.GetModelStatusResponse()
    for v, state, code, message in model.status(version):
      entry = response.model_version_status.add()
      entry.version = v
      entry.state = state
      entry.status.error_code = code
      entry.status.error_message = message
    return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer
                        ):
  """PredictionService: Predict and GetModelMetadata.

  Classify, Regress and MultiInference answer UNIMPLEMENTED (the base
  class does that): the dual model is served through Predict only.
  """

  def __init__(self, core, metrics=None):
    """Creates the servicer.

    Args:
      core: the `ServingCore` answering the requests.
      metrics: a `monitoring.Metrics` counting Predict requests, or None.
    """
    self._core = core
    self._metrics = metrics

  @_handle("Predict")
  def Predict(self, request, context):
    if self._metrics is None:
      return self._core.predict(request)
    start = time.monotonic()
    version, code = None, grpc.StatusCode.OK
    try:
      response = self._core.predict(request)
      version = response.model_spec.version.value
      return response
    except Exception as e:
      code, _ = status_of(e)
      raise
    finally:
      self._metrics.observe_request(request.model_spec.name, version,
                                    "Predict", "GRPC", code,
                                    time.monotonic() - start)

  @_handle("GetModelMetadata")
  def GetModelMetadata(self, request, context):
    return self._core.get_model_metadata(request)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
  """ModelService: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED)."""

  def __init__(self, core):
    """Creates the servicer; `core` is the `ServingCore` answering."""
    self._core = core

  @_handle("GetModelStatus")
  def GetModelStatus(self, request, context):
    return self._core.get_model_status(request)
