"""A SavedModel version loaded the way TF Serving's SavedModelBundle is.

TF Serving loads the MetaGraph tagged "serve" into a TF1 `Session` and runs
a signature by feeding and fetching the tensor names of its SignatureDef; it
never calls the TF2 object graph (`tf.saved_model.load`). `SavedModelBundle`
does the same, so an export that serves here serves there, and then replays
the export's warm-up records (`assets.extra/tf_serving_warmup_requests`,
PredictionLog records with a predict_log) through those signatures, as TF
Serving does before it marks a version available. A warm-up request that
fails fails the load.
"""

import contextlib
import dataclasses
import logging as logging_lib
import os
import threading

from absl import logging
import grpc

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf._keras import tf
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from tensorflow_serving.apis import prediction_log_pb2

SERVE_TAG = "serve"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving replays at most this many warm-up records.
MAX_WARMUP_RECORDS = 1000


class _DropDeprecation(logging_lib.Filter):
  """Drops TF's "... is deprecated" warnings: the TF1 loader is the one TF
  Serving uses, on purpose, and a user can do nothing about the warning."""

  def filter(self, record):
    return "is deprecated and will be removed" not in record.getMessage()


@contextlib.contextmanager
def no_deprecation_warning():
  """Inside, TF's "... is deprecated" warnings are not logged."""
  logger = tf.get_logger()
  drop = _DropDeprecation()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """A signature input as the request checks need it.

  Attributes:
    dtype: a `types_pb2.DataType` enum.
    dims: tuple of sizes, -1 for unknown; None for unknown rank.
  """
  dtype: int
  dims: tuple


class _SessionSignature:
  """Runs one SignatureDef in a Session by its tensor names."""

  def __init__(self, session, signature_def):
    self._inputs = sorted(signature_def.inputs)
    outputs = sorted(signature_def.outputs)
    # An output may name an operation ("NoOp" of an init signature): it is
    # run, and answered as None, as Session.run fetches it.
    self._outputs = [a for a in outputs
                     if ":" in signature_def.outputs[a].name]
    self._operations = [a for a in outputs if a not in self._outputs]
    # A callable prunes the graph once, not on every run, and skips
    # Session.run's per-call feed handling.
    self._run = keras_graph.session_callable(
        session, [signature_def.inputs[a].name for a in self._inputs],
        [signature_def.outputs[a].name for a in self._outputs],
        [signature_def.outputs[a].name for a in self._operations])

  def __call__(self, **arrays):
    """Runs the signature on {alias: numpy array}; returns {alias: array}."""
    values = self._run(*[arrays[alias] for alias in self._inputs])
    result = dict(zip(self._outputs, values))
    result.update(dict.fromkeys(self._operations))
    return result


def _dense(tensor_info):
  """Whether a TensorInfo names one dense tensor (not sparse or composite)."""
  return tensor_info.WhichOneof("encoding") == "name"


class SavedModelBundle:
  """One loaded SavedModel version and its runnable signatures.

  Attributes:
    version: the integer version.
    path: the version folder.
    signature_defs: {name: SignatureDef} of the "serve" MetaGraph, as TF
      Serving reports them in GetModelMetadata.
    warmup_records: how many warm-up records were replayed.
  """

  def __init__(self, version, path):
    """Loads the SavedModel in `path` into a Session, then warms it up.

    The Session uses TF's current intra- and inter-op thread settings
    (`tf.config.threading`, set from the server's flags).

    Args:
      version: the integer version.
      path: the version folder.

    Raises:
      RuntimeError: the SavedModel has no MetaGraph tagged "serve".
      ServingError: a warm-up record is malformed or names an unknown
        signature.
      Exception: whatever TF raises for a broken folder or a failing
        warm-up request.
    """
    self.version = version
    self.path = path
    self._use_lock = threading.Lock()
    self._users = 0
    self._unloaded = False
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=(
            tf.config.threading.get_intra_op_parallelism_threads()),
        inter_op_parallelism_threads=(
            tf.config.threading.get_inter_op_parallelism_threads()))
    graph = tf.Graph()
    self._session = tf.compat.v1.Session(graph=graph, config=config)
    try:
      with graph.as_default(), no_deprecation_warning():
        meta_graph = tf.compat.v1.saved_model.loader.load(
            self._session, [SERVE_TAG], path)
      self.signature_defs = dict(meta_graph.signature_def)
      self._functions = {}
      self._inputs = {}
      for name, sig in self.signature_defs.items():
        tensors = list(sig.inputs.values()) + list(sig.outputs.values())
        if not all(_dense(info) for info in tensors):
          logging.warning("Signature %s of %s has sparse or composite tensors; "
                          "it is not served.", name, path)
          continue
        with graph.as_default():
          self._functions[name] = _SessionSignature(self._session, sig)
        self._inputs[name] = {
            alias: InputSpec(
                info.dtype, None if info.tensor_shape.unknown_rank else tuple(
                    d.size for d in info.tensor_shape.dim))
            for alias, info in sig.inputs.items()
        }
      self.warmup_records = self._replay_warmup()
    except BaseException:
      # A failed load (retried with backoff) must not leak its Session.
      self._session.close()
      raise

  def close(self):
    """Closes the Session: its memory is freed now, not when collected.

    Signatures taken from this version fail afterwards (CancelledError,
    "Session has been closed").
    """
    self._session.close()

  def acquire(self):
    """Marks the version in use by one more request.

    Returns:
      False when it was unloaded already (its Session is closed or about to
      be): the caller resolves the version again.
    """
    with self._use_lock:
      if self._unloaded:
        return False
      self._users += 1
      return True

  def release(self):
    """Ends a use begun by `acquire`; closes an unloaded version's Session
    when its last request is done."""
    with self._use_lock:
      self._users -= 1
      close = self._unloaded and not self._users
    if close:
      self.close()

  def unload(self):
    """Closes the Session once no request uses it (now when none does).

    Its memory would otherwise stay until garbage collection gets to it,
    and a server that publishes versions often would hold several.
    """
    with self._use_lock:
      self._unloaded = True
      close = not self._users
    if close:
      self.close()

  def signature(self, name):
    """A signature of this version, ready to run.

    Args:
      name: the signature key.

    Returns:
      (function taking {alias: numpy array} as keywords and returning
      {output alias: numpy array}, {alias: InputSpec}, SignatureDef).

    Raises:
      ServingError: FAILED_PRECONDITION for an unknown key, as TF Serving.
    """
    fn = self._functions.get(name)
    if fn is None:
      raise errors.ServingError(
          grpc.StatusCode.FAILED_PRECONDITION,
          f"Serving signature key \"{name}\" not found.")
    return fn, self._inputs[name], self.signature_defs[name]

  def _replay_warmup(self):
    """Runs the export's warm-up Predict requests; returns how many."""
    path = os.path.join(self.path, WARMUP_PATH)
    if not os.path.exists(path):
      return 0
    count = 0
    for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
      log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
      if log.WhichOneof("log_type") != "predict_log":
        raise errors.invalid_argument(
            f"Warm-up record {count} in {path} is not a predict_log; only "
            "Predict is served.")
      request = log.predict_log.request
      name = request.model_spec.signature_name or contract.SERVING_SIGNATURE
      fn, specs, _ = self.signature(name)
      if set(request.inputs) != set(specs):
        raise errors.invalid_argument(
            f"Warm-up record {count} in {path} has the inputs "
            f"{sorted(request.inputs)}; signature {name} takes "
            f"{sorted(specs)}.")
      fn(**{alias: codec.decode(proto, alias)
            for alias, proto in request.inputs.items()})
      count += 1
    logging.info("Replayed %d warm-up records of %s.", count, self.path)
    return count
