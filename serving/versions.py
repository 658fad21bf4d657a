"""Served models and their versions: what is on disk, loaded, and reported.

A model's base path holds numeric version folders, as TF Serving lays them
out. `ModelManager` polls every base path, loads the versions each model's
`model_version_policy` wants (`ServedModel.poll`), unloads those it no longer
wants once a replacement is available, and answers which loaded version a
request's ModelSpec names (`ServedModel.resolve`) and what GetModelStatus
reports (`ServedModel.status`).
"""

import dataclasses
import os
import threading

from absl import logging
import grpc
from google.protobuf import text_format

from dropvar_tf._keras import tf
from dropvar_tf.serving import errors
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_State = get_model_status_pb2.ModelVersionStatus.State

DEFAULT_POLL_SECONDS = 1.0


def _request_debug_string(name, version):
  """The way TF Serving's ServableRequest::DebugString names a request."""
  if version is None:
    return f"Latest({name})"
  return f"Specific({name}, {version})"


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """A signature input as the request checks need it.

  Attributes:
    dtype: a `types_pb2.DataType` enum.
    dims: tuple of sizes, -1 for unknown; None for unknown rank.
  """
  dtype: int
  dims: tuple


class LoadedVersion:
  """One loaded SavedModel version and its runnable signatures.

  Attributes:
    version: the integer version.
    path: the version folder.
    signature_defs: {name: SignatureDef} read from saved_model.pb, as TF
      Serving reports them in GetModelMetadata.
  """

  def __init__(self, version, path):
    """Loads the SavedModel in `path`.

    Args:
      version: the integer version.
      path: the version folder.

    Raises:
      ValueError: the SavedModel has no MetaGraph tagged "serve".
      Exception: whatever `tf.saved_model.load` raises for a broken folder.
    """
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
          alias: InputSpec(
              info.dtype, None if info.tensor_shape.unknown_rank else tuple(
                  d.size for d in info.tensor_shape.dim))
          for alias, info in sig.inputs.items()
      }

  def signature(self, name):
    """A signature of this version, ready to run.

    Args:
      name: the signature key.

    Returns:
      (concrete function, {alias: InputSpec}, SignatureDef).

    Raises:
      ServingError: FAILED_PRECONDITION for an unknown key, as TF Serving.
    """
    fn = self._functions.get(name)
    if fn is None:
      raise errors.ServingError(
          grpc.StatusCode.FAILED_PRECONDITION,
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
    """Creates the model; nothing is loaded until `poll`.

    Args:
      config: its `ModelConfig` (name, base_path, model_version_policy,
        version_labels).
      max_load_attempts: loads of a version that may fail before it is given
        up (reported as END with the error).
    """
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
        raise errors.invalid_argument(
            f"Unrecognized servable version label: {label}")
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
    raise errors.ServingError(
        grpc.StatusCode.NOT_FOUND, "Servable not found for request: "
        f"{_request_debug_string(self.name, version)}")

  def status(self, version=None):
    """What GetModelStatus reports for this model.

    Args:
      version: one version to report; None for every known version.

    Returns:
      [(version, state enum, gRPC error code value, message)], by version.

    Raises:
      ServingError: NOT_FOUND when the version (or any version) is unknown.
    """
    with self._lock:
      states = dict(self._states)
    if version is not None:
      if version not in states:
        raise errors.ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Could not find version {version} of model {self.name}")
      return [(version,) + states[version]]
    if not states:
      raise errors.ServingError(
          grpc.StatusCode.NOT_FOUND,
          f"Could not find any versions of model {self.name}")
    return [(v,) + states[v] for v in sorted(states)]


class ModelManager:
  """All served models, and the thread that polls their base paths."""

  def __init__(self, model_configs, poll_seconds=DEFAULT_POLL_SECONDS):
    """Creates a `ServedModel` per config; nothing is loaded until `start`.

    Args:
      model_configs: `ModelConfig` protos.
      poll_seconds: seconds between polls of the base paths; 0 loads once
        at `start`.

    Raises:
      ValueError: a name is configured twice, or a model_platform other than
        "tensorflow" is asked for.
    """
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
    """Polls every model once; a failing model is logged, not raised."""
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
    """Stops the poller thread (loaded versions stay loaded)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def get(self, model_spec):
    """The ServedModel a request's ModelSpec names.

    Args:
      model_spec: a `tensorflow.serving.ModelSpec`.

    Returns:
      A `ServedModel`.

    Raises:
      ServingError: NOT_FOUND for an unknown model, worded like TF Serving.
    """
    model = self.models.get(model_spec.name)
    if model is None:
      version = (model_spec.version.value
                 if model_spec.HasField("version") else None)
      raise errors.ServingError(
          grpc.StatusCode.NOT_FOUND, "Servable not found for request: "
          f"{_request_debug_string(model_spec.name, version)}")
    return model

