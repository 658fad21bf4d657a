"""A local server that speaks the TF Serving gRPC API, for development and tests.

`dropvar_model_server` is started like `tensorflow_model_server`:

  dropvar_model_server --port=8500 --model_name=movies \
      --model_base_path=/models/movies

or with `--model_config_file` holding a text-format `ModelServerConfig` (the
same file a real TF Serving reads). It serves PredictionService.Predict,
PredictionService.GetModelMetadata and ModelService.GetModelStatus with the
official `tensorflow_serving.apis` messages, so a client written against it
works unchanged against a real TF Serving (>= 2.21).

Behaviour that matches TF Serving:
- Version folders: numeric sub-folders of the base path that hold a
  `saved_model.pb` are versions; anything else (temporary export folders,
  `1.tmp`, files) is ignored. The base path is polled every
  `--file_system_poll_wait_seconds`; a new version is loaded without restart,
  and, under the default "latest 1" policy, the older one is unloaded once the
  new one is available. `model_version_policy` and `version_labels` from the
  config file are honoured.
- Status codes and messages: NOT_FOUND "Servable not found for request:
  Latest(name)" / "Specific(name, 3)" for an unknown model or version;
  INVALID_ARGUMENT "Unrecognized servable version label: x"; FAILED_PRECONDITION
  'Serving signature key "x" not found.' (TF Serving uses FAILED_PRECONDITION,
  not NOT_FOUND, for an unknown signature); INVALID_ARGUMENT "input size does
  not match signature ..." for missing or extra inputs and "output tensor
  alias not found in signature: ..." for a bad `output_filter`; GetModelStatus
  NOT_FOUND "Could not find version 3 of model m" / "Could not find any
  versions of model m". Errors raised by TF while running the model keep their
  code (an out-of-range embedding id is INVALID_ARGUMENT).

Where this server is stricter than TF Serving (each answer names the input):
- Inputs are checked against the signature before running: dtype, rank and
  every known dimension; all inputs must share one batch size. TF Serving
  leaves most of these to the TF runtime, which answers INVALID_ARGUMENT too.
- An empty batch (batch size 0) is INVALID_ARGUMENT. TF Serving would run the
  graph and return empty outputs; for a model served one request at a time an
  empty request is a client bug, so it is refused.
- A batch larger than `--max_batch_size` is INVALID_ARGUMENT (TF Serving says
  the same when its batching is configured with `max_batch_size`).
- `tensor_content` whose byte length is not a multiple of the dtype size, or
  does not match the shape, is INVALID_ARGUMENT; so is a tensor whose shape
  would need more than `--max_request_bytes` bytes once decoded.
- NaN and Inf in float inputs are passed to the model, as TF Serving does
  (outputs then usually hold NaN). With `--reject_non_finite` they are
  INVALID_ARGUMENT naming the input instead.
- A request larger than `--max_request_bytes` on the wire is refused by gRPC
  itself with RESOURCE_EXHAUSTED.
Any other exception inside a handler is answered as INTERNAL with its message;
the server keeps running.

Where it is more lenient: a SavedModel exported with
`export_saved_model(..., jit_compile=True)` (XLA) runs here as it is;
`tensorflow_model_server` needs `--xla_cpu_compilation_enabled=true` for it.
"""

import dataclasses
import os
import signal
import sys
import threading
from concurrent import futures

from absl import app
from absl import flags
from absl import logging
import grpc
import numpy as np
from google.protobuf import text_format

from dropvar_tf import contract
from dropvar_tf._keras import tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

_SIGNATURE_DEF_FIELD = "signature_def"
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_State = get_model_status_pb2.ModelVersionStatus.State

# Default limits. A real TF Serving has no batch limit without batching and
# accepts messages up to 2 GiB; a development server is better off bounded.
DEFAULT_MAX_BATCH_SIZE = 8192
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_POLL_SECONDS = 1.0

# gRPC codes for the codes of `tf.errors.OpError` (same numbering).
_TF_TO_GRPC = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
  """A request failure with the gRPC status code it is answered with."""

  def __init__(self, code, message):
    super().__init__(message)
    self.code = code
    self.message = message


def _invalid(message):
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _request_debug_string(name, version):
  """The way TF Serving's ServableRequest::DebugString names a request."""
  if version is None:
    return f"Latest({name})"
  return f"Specific({name}, {version})"


def _dtype_name(enum):
  """'float' for DT_FLOAT, as TF error messages name dtypes."""
  try:
    return tf.dtypes.as_dtype(enum).name
  except TypeError:
    return f"unknown dtype {enum}"


def _shape_str(dims):
  return "[" + ",".join(str(d) for d in dims) + "]"


# ----------------------------------------------------------------------------
# Tensors.


def decode_tensor(name, proto, max_bytes):
  """Decodes an input TensorProto into a numpy array, validating it.

  Args:
    name: the input alias, used in error messages.
    proto: a `tensorflow.TensorProto`.
    max_bytes: the most bytes the decoded array may take.

  Returns:
    A numpy array with the proto's dtype and shape.

  Raises:
    ServingError: INVALID_ARGUMENT naming the input when the proto cannot be
      decoded (unknown dtype or rank, negative dimension, too large,
      tensor_content of the wrong byte length, too many values).
  """
  try:
    dtype = tf.dtypes.as_dtype(proto.dtype)
  except TypeError:
    raise _invalid(f"Input \"{name}\" has an unknown dtype enum "
                   f"{proto.dtype}.") from None
  if proto.dtype == types_pb2.DT_INVALID or dtype.is_quantized or (
      dtype._is_ref_dtype or dtype == tf.resource or dtype == tf.variant):  # pylint: disable=protected-access
    raise _invalid(f"Input \"{name}\" has an unsupported dtype "
                   f"{dtype.name}.")
  if proto.tensor_shape.unknown_rank:
    raise _invalid(f"Input \"{name}\" has an unknown rank; send a shape.")
  dims = [d.size for d in proto.tensor_shape.dim]
  if any(d < 0 for d in dims):
    raise _invalid(f"Input \"{name}\" has a negative dimension in shape "
                   f"{_shape_str(dims)}.")
  num_elements = 1
  for d in dims:
    num_elements *= d
  is_string = dtype == tf.string
  itemsize = 1 if is_string else np.dtype(dtype.as_numpy_dtype).itemsize
  if num_elements * itemsize > max_bytes:
    raise _invalid(f"Input \"{name}\" with shape {_shape_str(dims)} would "
                   f"take {num_elements * itemsize} bytes, more than the "
                   f"{max_bytes} allowed (--max_request_bytes).")
  if proto.tensor_content:
    if is_string:
      raise _invalid(f"Input \"{name}\": tensor_content is not valid for "
                     "string tensors; use string_val.")
    content = proto.tensor_content
    if len(content) % itemsize:
      raise _invalid(
          f"Input \"{name}\": tensor_content has {len(content)} bytes, not a "
          f"multiple of {itemsize} (the size of {dtype.name}).")
    if len(content) // itemsize != num_elements:
      raise _invalid(
          f"Input \"{name}\": tensor_content holds {len(content) // itemsize} "
          f"{dtype.name} values but shape {_shape_str(dims)} needs "
          f"{num_elements}.")
    # TF writes tensor_content in little-endian byte order.
    np_dtype = np.dtype(dtype.as_numpy_dtype).newbyteorder("<")
    return np.frombuffer(content, dtype=np_dtype).reshape(dims)
  num_values = _num_typed_values(proto)
  if num_values > num_elements:
    raise _invalid(
        f"Input \"{name}\" holds {num_values} values but shape "
        f"{_shape_str(dims)} needs {num_elements}.")
  try:
    # Fewer values than elements follows TF: the last value is repeated
    # (zeros when none is given).
    return tf.make_ndarray(proto)
  except Exception as e:  # pylint: disable=broad-except
    raise _invalid(f"Input \"{name}\" could not be decoded: {e}") from None


def _num_typed_values(proto):
  """Number of values in the typed (non tensor_content) fields of `proto`."""
  fields = ("half_val", "float_val", "double_val", "int_val", "string_val",
            "int64_val", "bool_val", "uint32_val", "uint64_val")
  total = sum(len(getattr(proto, f)) for f in fields)
  # Complex numbers use two entries per value.
  total += (len(proto.scomplex_val) + len(proto.dcomplex_val)) // 2
  return total


def encode_tensor(array):
  """Encodes a numpy array as a TensorProto using tensor_content.

  tensor_content is one bytes copy of the array; per-element `float_val`
  lists cost a Python object per value.

  Args:
    array: a numpy array (any numeric or bool dtype; strings fall back to
      `tf.make_tensor_proto`).

  Returns:
    A `tensorflow.TensorProto`.
  """
  array = np.asarray(array)
  if array.dtype.kind in "OUS":
    return tf.make_tensor_proto(array)
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  proto = tensor_pb2.TensorProto(
      dtype=tf.dtypes.as_dtype(array.dtype).as_datatype_enum,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
               for d in array.shape]),
      tensor_content=np.ascontiguousarray(array).tobytes())
  return proto


# ----------------------------------------------------------------------------
# Loaded versions.


@dataclasses.dataclass(frozen=True)
class _InputSpec:
  dtype: int  # types_pb2 enum.
  dims: tuple  # -1 for unknown; None for unknown rank.


class LoadedVersion:
  """One loaded SavedModel version and its runnable signatures.

  Attributes:
    version: the integer version.
    path: the version folder.
    signature_defs: {name: SignatureDef} read from saved_model.pb, as TF
      Serving reports them in GetModelMetadata.
  """

  def __init__(self, version, path):
    self.version = version
    self.path = path
    self.signature_defs = _read_signature_defs(path)
    self._loaded = tf.saved_model.load(path)
    self._functions = {}
    self._inputs = {}
    for name, fn in self._loaded.signatures.items():
      sig = self.signature_defs.get(name)
      if sig is None:
        continue
      self._functions[name] = fn
      self._inputs[name] = {
          alias: _InputSpec(
              info.dtype, None if info.tensor_shape.unknown_rank else tuple(
                  d.size for d in info.tensor_shape.dim))
          for alias, info in sig.inputs.items()
      }

  def signature(self, name):
    """Returns (function, input specs, SignatureDef) or raises."""
    fn = self._functions.get(name)
    if fn is None:
      raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"Serving signature key \"{name}\" not found.")
    return fn, self._inputs[name], self.signature_defs[name]


def _read_signature_defs(path):
  """Reads {name: SignatureDef} of the serving MetaGraph of a SavedModel."""
  pb_path = os.path.join(path, "saved_model.pb")
  saved_model = saved_model_pb2.SavedModel()
  if os.path.exists(pb_path):
    with open(pb_path, "rb") as f:
      saved_model.ParseFromString(f.read())
  else:
    with open(os.path.join(path, "saved_model.pbtxt")) as f:
      text_format.Parse(f.read(), saved_model)
  for meta_graph in saved_model.meta_graphs:
    if "serve" in meta_graph.meta_info_def.tags:
      return dict(meta_graph.signature_def)
  raise ValueError(f"No MetaGraph tagged 'serve' in {path}.")


def list_versions(base_path):
  """Numeric version folders under `base_path` that hold a SavedModel.

  Temporary folders (non-numeric names) and numeric folders without
  `saved_model.pb` yet are skipped, so an export in progress is never loaded.

  Args:
    base_path: the model's base path.

  Returns:
    {version: folder path}; empty when `base_path` does not exist.
  """
  try:
    names = os.listdir(base_path)
  except OSError:
    return {}
  versions = {}
  for name in names:
    if not name.isdigit() or not name.isascii():
      continue
    path = os.path.join(base_path, name)
    if not os.path.isdir(path):
      continue
    if not any(os.path.exists(os.path.join(path, f))
               for f in _SAVED_MODEL_FILES):
      continue
    versions[int(name)] = path
  return versions


class ServedModel:
  """One model name: its versions on disk, loaded versions and their states.

  Thread safety: `poll` runs on the poller thread; request handlers call
  `resolve` and `status` concurrently. The loaded-version map is replaced,
  never mutated in place, so readers need no lock.
  """

  def __init__(self, config, max_load_attempts=3):
    self.name = config.name
    self.base_path = config.base_path
    self.policy = config.model_version_policy
    self.labels = dict(config.version_labels)
    self._max_load_attempts = max_load_attempts
    self._loaded = {}  # version -> LoadedVersion.
    # version -> (state enum, grpc code value, message); what GetModelStatus
    # reports.
    self._states = {}
    self._failures = {}  # version -> failed load attempts.
    self._lock = threading.Lock()

  def _wanted(self, on_disk):
    """Versions the policy wants loaded, among those on disk."""
    candidates = sorted(
        v for v in on_disk if self._failures.get(v, 0) <
        self._max_load_attempts)
    which = self.policy.WhichOneof("policy_choice")
    if which == "all":
      return set(candidates)
    if which == "specific":
      return set(candidates) & set(self.policy.specific.versions)
    num = self.policy.latest.num_versions if which == "latest" else 1
    return set(candidates[-max(num, 1):])

  def poll(self):
    """Loads versions the policy wants, then unloads those it dropped."""
    on_disk = list_versions(self.base_path)
    if not on_disk and not self._loaded and not self._states:
      logging.log_every_n_seconds(
          logging.WARNING, "No versions of servable %s found under base path "
          "%s.", 60, self.name, self.base_path)
    wanted = self._wanted(on_disk)
    for version in sorted(wanted - set(self._loaded)):
      self._load(version, on_disk[version])
    available = set(self._loaded) & wanted
    # Keep old versions until a wanted one is up (availability preserving);
    # a version whose folder was deleted goes regardless.
    drop = [v for v in self._loaded
            if v not in wanted and (available or v not in on_disk)]
    if drop:
      with self._lock:
        loaded = dict(self._loaded)
        for version in drop:
          loaded.pop(version)
          self._states[version] = (_State.END, 0, "")
          logging.info("Unloaded servable version {name: %s version: %d}",
                       self.name, version)
        self._loaded = loaded

  def _load(self, version, path):
    with self._lock:
      self._states[version] = (_State.LOADING, 0, "")
    logging.info("Loading servable version {name: %s version: %d} from %s",
                 self.name, version, path)
    try:
      loaded = LoadedVersion(version, path)
    except Exception as e:  # pylint: disable=broad-except
      self._failures[version] = self._failures.get(version, 0) + 1
      logging.error("Loading servable version {name: %s version: %d} failed "
                    "(attempt %d): %s", self.name, version,
                    self._failures[version], e)
      with self._lock:
        self._states[version] = (_State.END,
                                 grpc.StatusCode.UNKNOWN.value[0],
                                 f"Loading failed: {e}")
      return
    with self._lock:
      self._loaded = {**self._loaded, version: loaded}
      self._states[version] = (_State.AVAILABLE, 0, "")
    logging.info("Successfully loaded servable version {name: %s version: "
                 "%d}", self.name, version)

  def resolve(self, model_spec):
    """The loaded version a ModelSpec asks for.

    Args:
      model_spec: a `tensorflow.serving.ModelSpec`.

    Returns:
      A `LoadedVersion`.

    Raises:
      ServingError: INVALID_ARGUMENT for an unknown version label, NOT_FOUND
        when the version (or any version) is not loaded.
    """
    loaded = self._loaded
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version_label":
      label = model_spec.version_label
      if label not in self.labels:
        raise _invalid(f"Unrecognized servable version label: {label}")
      version = self.labels[label]
    elif choice == "version":
      version = model_spec.version.value
    else:
      version = None
    if version is None:
      if loaded:
        return loaded[max(loaded)]
    elif version in loaded:
      return loaded[version]
    raise ServingError(
        grpc.StatusCode.NOT_FOUND, "Servable not found for request: "
        f"{_request_debug_string(self.name, version)}")

  def status(self, version=None):
    """[(version, state, error code value, message)] for GetModelStatus."""
    with self._lock:
      states = dict(self._states)
    if version is not None:
      if version not in states:
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Could not find version {version} of model {self.name}")
      return [(version,) + states[version]]
    if not states:
      raise ServingError(grpc.StatusCode.NOT_FOUND,
                         f"Could not find any versions of model {self.name}")
    return [(v,) + states[v] for v in sorted(states)]


class ModelManager:
  """All served models, and the thread that polls their base paths."""

  def __init__(self, model_configs, poll_seconds=DEFAULT_POLL_SECONDS):
    self.models = {}
    for config in model_configs:
      if config.name in self.models:
        raise ValueError(f"Model {config.name!r} is configured twice.")
      if config.model_platform and config.model_platform != "tensorflow":
        raise ValueError(f"Model {config.name!r}: only model_platform "
                         f"'tensorflow' is served; got "
                         f"{config.model_platform!r}.")
      self.models[config.name] = ServedModel(config)
    self.poll_seconds = poll_seconds
    self._stop = threading.Event()
    self._thread = None

  def poll_once(self):
    for model in self.models.values():
      try:
        model.poll()
      except Exception:  # pylint: disable=broad-except
        logging.exception("Polling model %s failed", model.name)

  def start(self):
    """Loads what is on disk now, then polls in a daemon thread."""
    self.poll_once()
    if self.poll_seconds > 0:
      self._thread = threading.Thread(target=self._run, daemon=True,
                                      name="model-poller")
      self._thread.start()

  def _run(self):
    while not self._stop.wait(self.poll_seconds):
      self.poll_once()

  def stop(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def get(self, model_spec):
    """The ServedModel a request names, or NOT_FOUND like TF Serving."""
    model = self.models.get(model_spec.name)
    if model is None:
      version = (model_spec.version.value
                 if model_spec.HasField("version") else None)
      raise ServingError(
          grpc.StatusCode.NOT_FOUND, "Servable not found for request: "
          f"{_request_debug_string(model_spec.name, version)}")
    return model


# ----------------------------------------------------------------------------
# Request handling.


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  """Request limits of the server.

  Attributes:
    max_batch_size: the largest batch (first dimension) accepted.
    max_request_bytes: the largest request on the wire, and the largest
      decoded input tensor.
    reject_non_finite: answer INVALID_ARGUMENT for NaN/Inf in float inputs
      instead of passing them to the model.
  """
  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
  max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
  reject_non_finite: bool = False


def _check_inputs(request_inputs, specs, options):
  """Decodes and validates the request inputs against a signature.

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
    raise _invalid(
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
      raise _invalid(
          f"Input \"{alias}\" expects dtype {_dtype_name(spec.dtype)} but "
          f"{_dtype_name(proto.dtype)} was sent.")
    array = decode_tensor(alias, proto, options.max_request_bytes)
    if spec.dims is not None:
      if array.ndim != len(spec.dims):
        raise _invalid(
            f"Input \"{alias}\" expects rank {len(spec.dims)} (shape "
            f"{_shape_str(spec.dims)}) but got rank {array.ndim} (shape "
            f"{_shape_str(array.shape)}).")
      for axis, (want, got) in enumerate(zip(spec.dims, array.shape)):
        if want >= 0 and want != got:
          raise _invalid(
              f"Input \"{alias}\" expects shape {_shape_str(spec.dims)} but "
              f"got {_shape_str(array.shape)} (dimension {axis} is {got}, "
              f"expected {want}).")
      if spec.dims and spec.dims[0] < 0:
        size = array.shape[0]
        if size == 0:
          raise _invalid(f"Input \"{alias}\" has an empty batch (batch size "
                         "0); send at least one example.")
        if size > options.max_batch_size:
          raise _invalid(
              f"Input \"{alias}\" has batch size {size}, larger than the "
              f"maximum batch size {options.max_batch_size} "
              "(--max_batch_size).")
        if batch is None:
          batch = (alias, size)
        elif size != batch[1]:
          raise _invalid(
              f"Input \"{alias}\" has batch size {size} but input "
              f"\"{batch[0]}\" has {batch[1]}; all inputs must have the same "
              "0th-dimension size.")
    if (options.reject_non_finite and array.dtype.kind in "fc" and
        not np.all(np.isfinite(array))):
      raise _invalid(f"Input \"{alias}\" contains NaN or Inf values "
                     "(--reject_non_finite).")
    arrays[alias] = array
  return arrays


def _output_aliases(output_filter, signature_def):
  """The output aliases to return, validated like TF Serving."""
  if not output_filter:
    return list(signature_def.outputs)
  seen = set()
  for alias in output_filter:
    if alias not in signature_def.outputs:
      raise _invalid(
          f"output tensor alias not found in signature: {alias} Outputs "
          "expected to be in the set "
          f"{{{','.join(sorted(signature_def.outputs))}}}.")
    if alias in seen:
      raise _invalid(f"duplicate output tensor alias: {alias}")
    seen.add(alias)
  return list(output_filter)


def _abort(context, code, message):
  # Raises; called from `except` clauses so it is not caught again.
  context.abort(code, message)


def _handle(method_name):
  """Wraps a servicer method: ServingError -> its status, others INTERNAL."""

  def decorator(fn):

    def wrapper(self, request, context):
      try:
        return fn(self, request, context)
      except ServingError as e:
        _abort(context, e.code, e.message)
      except tf.errors.OpError as e:
        code = _TF_TO_GRPC.get(e.error_code, grpc.StatusCode.INTERNAL)
        _abort(context, code, e.message)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("%s failed", method_name)
        _abort(context, grpc.StatusCode.INTERNAL,
               f"{method_name} failed: {type(e).__name__}: {e}")

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper

  return decorator


def _require_model_spec(request):
  if not request.HasField("model_spec"):
    raise _invalid("Missing ModelSpec")
  return request.model_spec


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer
                        ):
  """PredictionService: Predict and GetModelMetadata.

  Classify, Regress and MultiInference answer UNIMPLEMENTED (the base
  class does that): the dual model is served through Predict only.
  """

  def __init__(self, manager, options):
    self._manager = manager
    self._options = options

  @_handle("Predict")
  def Predict(self, request, context):  # pylint: disable=invalid-name
    model_spec = _require_model_spec(request)
    version = self._manager.get(model_spec).resolve(model_spec)
    signature_name = model_spec.signature_name or contract.SERVING_SIGNATURE
    fn, specs, signature_def = version.signature(signature_name)
    arrays = _check_inputs(request.inputs, specs, self._options)
    aliases = _output_aliases(request.output_filter, signature_def)
    outputs = fn(**arrays)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_spec.name
    response.model_spec.version.value = version.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
      response.outputs[alias].CopyFrom(encode_tensor(outputs[alias].numpy()))
    return response

  @_handle("GetModelMetadata")
  def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
    model_spec = _require_model_spec(request)
    if not request.metadata_field:
      raise _invalid(
          "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
      if field != _SIGNATURE_DEF_FIELD:
        raise _invalid(f"Metadata field {field} is not supported")
    version = self._manager.get(model_spec).resolve(model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in version.signature_defs.items():
      signature_map.signature_def[name].CopyFrom(sig)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model_spec.name
    response.model_spec.version.value = version.version
    response.metadata[_SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
  """ModelService: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED)."""

  def __init__(self, manager):
    self._manager = manager

  @_handle("GetModelStatus")
  def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
    model_spec = _require_model_spec(request)
    model = self._manager.models.get(model_spec.name)
    if model is None:
      raise ServingError(
          grpc.StatusCode.NOT_FOUND,
          f"Could not find any versions of model {model_spec.name}")
    choice = model_spec.WhichOneof("version_choice")
    version = None
    if choice == "version":
      version = model_spec.version.value
    elif choice == "version_label":
      if model_spec.version_label not in model.labels:
        raise _invalid("Unrecognized servable version label: "
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


# ----------------------------------------------------------------------------
# Server.


def model_configs_from_file(path):
  """Parses a text-format ModelServerConfig (TF Serving's --model_config_file).

  Args:
    path: the config file.

  Returns:
    A list of `ModelConfig` protos.

  Raises:
    ValueError: the file does not parse, uses `custom_model_config`, or a
      model lacks a name or base_path.
  """
  with open(path) as f:
    text = f.read()
  config = model_server_config_pb2.ModelServerConfig()
  try:
    text_format.Parse(text, config)
  except text_format.ParseError as e:
    raise ValueError(f"Could not parse model config file {path}: {e}") from e
  if config.WhichOneof("config") != "model_config_list":
    raise ValueError(f"Model config file {path} must hold a "
                     "model_config_list.")
  configs = list(config.model_config_list.config)
  for c in configs:
    if not c.name or not c.base_path:
      one_line = text_format.MessageToString(c, as_one_line=True)
      raise ValueError(f"Model config file {path}: every config needs a name "
                       f"and a base_path; got {one_line!r}.")
  return configs


def model_config(name, base_path):
  """A ModelConfig for one model served from `base_path` (latest version)."""
  return model_server_config_pb2.ModelConfig(
      name=name, base_path=os.path.abspath(base_path),
      model_platform="tensorflow")


class ModelServer:
  """A gRPC ModelServer for dual models, in process.

  Example:

  ```python
  server = ModelServer([model_config("movies", "/tmp/export")], port=0)
  port = server.start()
  ...
  server.stop()
  ```
  """

  def __init__(self, model_configs, host="127.0.0.1", port=0,
               poll_seconds=DEFAULT_POLL_SECONDS, options=None,
               max_workers=4):
    """Creates the server; nothing is loaded or bound until `start`.

    Args:
      model_configs: `ModelConfig` protos (see `model_config`,
        `model_configs_from_file`).
      host: interface to bind; loopback by default.
      port: TCP port; 0 picks a free one.
      poll_seconds: how often base paths are polled for new versions; 0
        loads once at start.
      options: `ServerOptions`.
      max_workers: request handler threads.
    """
    self.host = host
    self.port = port
    self.options = options or ServerOptions()
    self.manager = ModelManager(model_configs, poll_seconds)
    self._max_workers = max_workers
    self._server = None

  def start(self):
    """Loads the models, binds and starts serving.

    Returns:
      The bound port.

    Raises:
      RuntimeError: the address cannot be bound.
    """
    self.manager.start()
    limit = self.options.max_request_bytes
    self._server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                   thread_name_prefix="grpc-handler"),
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(self.manager, self.options), self._server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(self.manager), self._server)
    address = f"{self.host}:{self.port}"
    if ":" in self.host and not self.host.startswith("["):
      address = f"[{self.host}]:{self.port}"
    try:
      bound = self._server.add_insecure_port(address)
    except RuntimeError as e:
      self.manager.stop()
      raise RuntimeError(f"Could not bind {address}: {e}") from e
    if not bound:
      self.manager.stop()
      raise RuntimeError(f"Could not bind {address}.")
    self.port = bound
    self._server.start()
    return bound

  @property
  def target(self):
    return f"{self.host}:{self.port}"

  def stop(self, grace=1.0):
    """Stops accepting requests, lets running ones finish, stops polling."""
    if self._server is not None:
      self._server.stop(grace).wait()
      self._server = None
    self.manager.stop()

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS

def _define(define, name, *args, **kwargs):
  # Another module may already define a flag of the same name and meaning
  # (--model_name); defining it twice is an error in absl.
  if name not in FLAGS:
    define(name, *args, **kwargs)


def define_flags():
  """Defines this command's flags; called by `run_main`, not at import.

  Defining them at import would clash with other modules' flags whenever
  both are imported (tests, notebooks).
  """
  _define(flags.DEFINE_integer, "port", 8500,
          "gRPC port; 0 picks a free port.")
  _define(flags.DEFINE_string, "host", "127.0.0.1",
          "Interface to bind (loopback by default; 0.0.0.0 for all).")
  _define(flags.DEFINE_string, "model_name", "default",
          "Name of the model (with --model_base_path).")
  _define(flags.DEFINE_string, "model_base_path", None,
          "Folder holding numeric version folders of the model.")
  _define(flags.DEFINE_string, "model_config_file", None,
          "Text-format ModelServerConfig (as tensorflow_model_server reads); "
          "overrides --model_name/--model_base_path.")
  _define(flags.DEFINE_float, "file_system_poll_wait_seconds",
          DEFAULT_POLL_SECONDS,
          "Seconds between polls for new versions; 0 loads once.")
  _define(flags.DEFINE_integer, "max_batch_size", DEFAULT_MAX_BATCH_SIZE,
          "Largest batch size accepted per request.")
  _define(flags.DEFINE_integer, "max_request_bytes",
          DEFAULT_MAX_REQUEST_BYTES,
          "Largest request accepted, in bytes (gRPC "
          "max_receive_message_length and decoded tensor size).")
  _define(flags.DEFINE_bool, "reject_non_finite", False,
          "Answer INVALID_ARGUMENT for NaN/Inf in float inputs instead of "
          "passing them to the model.")
  _define(flags.DEFINE_integer, "num_workers", 4, "Request handler threads.")
  _define(flags.DEFINE_integer, "tensorflow_intra_op_parallelism", 0,
          "Threads one TF op may use; 0 lets TF choose (as in "
          "tensorflow_model_server).")
  _define(flags.DEFINE_integer, "tensorflow_inter_op_parallelism", 0,
          "Threads running independent TF ops at once; 0 lets TF choose. "
          "On a small CPU machine 1 keeps the variation head's ops from "
          "competing with the base model's matmuls (bench/dual_bench.py).")
  _define(flags.DEFINE_integer, "rest_api_port", 0,
          "Accepted for compatibility with tensorflow_model_server; this "
          "server has no REST API.")


def _configs_from_flags():
  if FLAGS.model_config_file:
    return model_configs_from_file(FLAGS.model_config_file)
  if not FLAGS.model_base_path:
    raise app.UsageError(
        "Pass --model_base_path (with --model_name) or --model_config_file.")
  return [model_config(FLAGS.model_name, FLAGS.model_base_path)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.rest_api_port:
    logging.warning("--rest_api_port=%d ignored: dropvar_model_server only "
                    "serves gRPC.", FLAGS.rest_api_port)
  for name in ("max_batch_size", "max_request_bytes", "num_workers"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1.")
  for name in ("tensorflow_intra_op_parallelism",
               "tensorflow_inter_op_parallelism"):
    if getattr(FLAGS, name) < 0:
      raise app.UsageError(f"--{name} must be >= 0.")
  # Before any model is loaded: TF fixes its thread pools on first use.
  tf.config.threading.set_intra_op_parallelism_threads(
      FLAGS.tensorflow_intra_op_parallelism)
  tf.config.threading.set_inter_op_parallelism_threads(
      FLAGS.tensorflow_inter_op_parallelism)
  print("TensorFlow threads: intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter-op "
        f"{tf.config.threading.get_inter_op_parallelism_threads()} "
        "(0: TF's choice)", flush=True)
  try:
    configs = _configs_from_flags()
    server = ModelServer(
        configs, host=FLAGS.host, port=FLAGS.port,
        poll_seconds=FLAGS.file_system_poll_wait_seconds,
        options=ServerOptions(max_batch_size=FLAGS.max_batch_size,
                              max_request_bytes=FLAGS.max_request_bytes,
                              reject_non_finite=FLAGS.reject_non_finite),
        max_workers=FLAGS.num_workers)
  except (ValueError, OSError) as e:
    logging.error("%s", e)
    return 1
  stop = threading.Event()

  def on_signal(signum, frame):  # pylint: disable=unused-argument
    logging.info("Received signal %d, shutting down.", signum)
    stop.set()

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  try:
    port = server.start()
  except RuntimeError as e:
    logging.error("%s", e)
    return 1
  # Tests and scripts wait for this line (TF Serving prints the same).
  message = f"Running gRPC ModelServer at {server.host}:{port} ..."
  logging.info("%s", message)
  print(message, flush=True)
  while not stop.wait(0.5):
    pass
  server.stop(grace=2.0)
  logging.info("Server stopped.")
  return 0


def run_main():
  """Console entry point `dropvar_model_server`."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run_main()
