"""Served models and their versions: what is on disk, loaded, and reported.

A model's base path holds numeric version folders, as TF Serving lays them
out. `ModelManager` polls every base path, loads the versions each model's
`model_version_policy` wants (`ServedModel.poll`), unloads those it no longer
wants once a replacement is available, and answers which loaded version a
request's ModelSpec names (`ServedModel.resolve`) and what GetModelStatus
reports (`ServedModel.status`).
"""

import contextlib
import dataclasses
import os
import threading
import time

from absl import logging
import grpc

from dropvar_tf import contract
from dropvar_tf.serving import bundle
from dropvar_tf.serving import errors
from tensorflow_serving.apis import get_model_status_pb2

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_State = get_model_status_pb2.ModelVersionStatus.State

DEFAULT_POLL_SECONDS = 1.0
# Failed loads are retried after 1, 2, 4, ... seconds, at most a minute apart
# (TF Serving retries after --load_retry_interval_micros, a minute).
DEFAULT_RETRY_BACKOFF_SECONDS = 1.0
MAX_RETRY_BACKOFF_SECONDS = 60.0


def _request_debug_string(name, version):
  """The way TF Serving's ServableRequest::DebugString names a request."""
  if version is None:
    return f"Latest({name})"
  return f"Specific({name}, {version})"


def list_versions(base_path):
  """Numeric version folders under `base_path` that hold a SavedModel.

  Temporary folders (non-numeric names) and numeric folders without
  `saved_model.pb` yet are skipped, so an export in progress is never loaded.

  Args:
    base_path: the model's base path.

  Returns:
    {version: folder path}.

  Raises:
    OSError: `base_path` is missing or cannot be listed. The caller keeps
      what it serves: a base path that is renamed or unmounted for a moment
      must not unload every version (TF Serving keeps them too).
  """
  names = os.listdir(base_path)
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
    if int(name) > contract.MAX_VERSION:
      # Not an int64, so not a version TF Serving would load (it skips the
      # folder); it must not replace the versions being served.
      logging.log_every_n_seconds(
          logging.WARNING, "Ignoring %s: version numbers are int64 (at most "
          "%d).", 60, path, contract.MAX_VERSION)
      continue
    versions[int(name)] = path
  return versions


def folder_fingerprint(path):
  """What changes when a version folder is written to: its files and times.

  Args:
    path: a version folder.

  Returns:
    A hashable tuple of (relative path, size, mtime in ns) for the folder and
    every file and folder under it; None when it cannot be read.
  """
  entries = []
  try:
    for root, dirs, files in os.walk(path, onerror=_raise):
      for name in [""] + sorted(dirs) + sorted(files):
        full = os.path.join(root, name) if name else root
        stat = os.stat(full)
        entries.append((os.path.relpath(full, path), stat.st_size,
                        stat.st_mtime_ns))
  except OSError:
    return None
  return tuple(entries)


def _raise(error):
  raise error


@dataclasses.dataclass
class _Failure:
  """The failed loads of one version, and when to try it again.

  Attributes:
    attempts: failed loads since the folder last changed.
    retry_at: `time.monotonic()` before which it is not tried again.
    fingerprint: `folder_fingerprint` of the folder at the last attempt.
  """
  attempts: int
  retry_at: float
  fingerprint: tuple


class ServedModel:
  """One model name: its versions on disk, loaded versions and their states.

  Thread safety: `poll` runs on the poller thread; request handlers call
  `resolve` and `status` concurrently. The loaded-version map is replaced,
  never mutated in place, so readers need no lock.
  """

  def __init__(self, config, max_load_attempts=3,
               retry_backoff_seconds=DEFAULT_RETRY_BACKOFF_SECONDS):
    """Creates the model; nothing is loaded until `poll`.

    Args:
      config: its `ModelConfig` (name, base_path, model_version_policy,
        version_labels).
      max_load_attempts: loads of a version that may fail before it is given
        up (reported as END with the error) until its folder changes.
      retry_backoff_seconds: wait before the first retry of a failed load;
        it doubles with each failure, up to `MAX_RETRY_BACKOFF_SECONDS`.
    """
    self.name = config.name
    self.base_path = config.base_path
    self.policy = config.model_version_policy
    self.labels = dict(config.version_labels)
    self._max_load_attempts = max_load_attempts
    self._retry_backoff_seconds = retry_backoff_seconds
    self._loaded = {}  # version -> bundle.SavedModelBundle.
    # version -> (state enum, grpc code value, message); what GetModelStatus
    # reports.
    self._states = {}
    self._failures = {}  # version -> _Failure.
    self._lock = threading.Lock()

  @property
  def loaded_versions(self):
    """The loaded versions, sorted."""
    return sorted(self._loaded)

  def _wanted(self, on_disk):
    """Versions the policy wants loaded, among those on disk."""
    candidates = sorted(
        v for v in on_disk if v not in self._failures or
        self._failures[v].attempts < self._max_load_attempts)
    which = self.policy.WhichOneof("policy_choice")
    if which == "all":
      return set(candidates)
    if which == "specific":
      return set(candidates) & set(self.policy.specific.versions)
    num = self.policy.latest.num_versions if which == "latest" else 1
    return set(candidates[-max(num, 1):])

  def _forget_changed_failures(self, on_disk):
    """Gives a failed version fresh attempts when its folder has changed.

    A slow copy that was loaded half-written, or a folder deleted and
    published again, is loaded again instead of staying failed until a
    restart. A pending backoff is kept, so a copy still in progress is not
    loaded on every poll.
    """
    for version in list(self._failures):
      if version not in on_disk:
        del self._failures[version]
        continue
      failure = self._failures[version]
      fingerprint = folder_fingerprint(on_disk[version])
      if fingerprint != failure.fingerprint:
        logging.info("Folder of servable version {name: %s version: %d} "
                     "changed; loading it again.", self.name, version)
        self._failures[version] = _Failure(0, failure.retry_at, fingerprint)

  def poll(self):
    """Loads versions the policy wants, then unloads those it dropped.

    When the base path cannot be listed (missing, renamed, unreadable), the
    loaded versions stay served and an error naming the path is logged.
    """
    try:
      on_disk = list_versions(self.base_path)
    except OSError as e:
      logging.log_every_n_seconds(
          logging.ERROR, "Cannot list the base path %s of servable %s (%s); "
          "still serving its loaded versions %s.", 10, self.base_path,
          self.name, e, self.loaded_versions)
      return
    if not on_disk and not self._loaded and not self._states:
      logging.log_every_n_seconds(
          logging.WARNING, "No versions of servable %s found under base path "
          "%s.", 60, self.name, self.base_path)
    self._forget_changed_failures(on_disk)
    wanted = self._wanted(on_disk)
    now = time.monotonic()
    for version in sorted(wanted - set(self._loaded)):
      failure = self._failures.get(version)
      if failure is None or now >= failure.retry_at:
        self._load(version, on_disk[version])
    available = set(self._loaded) & wanted
    # Keep old versions until a wanted one is up (availability preserving);
    # a version whose folder was deleted goes regardless.
    drop = [v for v in self._loaded
            if v not in wanted and (available or v not in on_disk)]
    if drop:
      with self._lock:
        loaded = dict(self._loaded)
        unloaded = [loaded.pop(version) for version in drop]
        for version in drop:
          self._states[version] = (_State.END, 0, "")
          logging.info("Unloaded servable version {name: %s version: %d}",
                       self.name, version)
        self._loaded = loaded
      # Requests that took a version before the swap finish on it; its
      # Session closes when the last of them is done.
      for version in unloaded:
        version.unload()

  def _load(self, version, path):
    with self._lock:
      self._states[version] = (_State.LOADING, 0, "")
    logging.info("Loading servable version {name: %s version: %d} from %s",
                 self.name, version, path)
    fingerprint = folder_fingerprint(path)
    try:
      loaded = bundle.SavedModelBundle(version, path)
    except Exception as e:
      self._record_failure(version, path, fingerprint, e)
      return
    self._failures.pop(version, None)
    with self._lock:
      self._loaded = {**self._loaded, version: loaded}
      self._states[version] = (_State.AVAILABLE, 0, "")
    logging.info("Successfully loaded servable version {name: %s version: "
                 "%d}", self.name, version)

  def _record_failure(self, version, path, fingerprint, error):
    """Logs a failed load and schedules its retry with backoff."""
    previous = self._failures.get(version)
    attempts = (previous.attempts if previous else 0) + 1
    delay = min(self._retry_backoff_seconds * 2**(attempts - 1),
                MAX_RETRY_BACKOFF_SECONDS)
    self._failures[version] = _Failure(attempts, time.monotonic() + delay,
                                       fingerprint)
    if attempts < self._max_load_attempts:
      then = f"retrying in {delay:g} s"
    else:
      then = "giving up until its folder changes"
    logging.error("Loading servable version {name: %s version: %d} from %s "
                  "failed (attempt %d of %d; %s): %s", self.name, version,
                  path, attempts, self._max_load_attempts, then, error)
    with self._lock:
      self._states[version] = (_State.END, grpc.StatusCode.UNKNOWN.value[0],
                               f"Loading failed: {error}")

  def resolve(self, model_spec):
    """The loaded version a ModelSpec asks for.

    Args:
      model_spec: a `tensorflow.serving.ModelSpec`.

    Returns:
      A `bundle.SavedModelBundle`.

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

  @contextlib.contextmanager
  def use(self, model_spec):
    """The loaded version a ModelSpec asks for, held for one request.

    An unloaded version's Session is closed only once no request holds it.

    Args:
      model_spec: a `tensorflow.serving.ModelSpec`.

    Yields:
      A `bundle.SavedModelBundle`, open until the block ends.

    Raises:
      ServingError: as `resolve`.
    """
    while True:
      version = self.resolve(model_spec)
      # False only when it was unloaded since `resolve` read the map, which
      # has been replaced by then: the next `resolve` sees the new one.
      if version.acquire():
        break
    try:
      yield version
    finally:
      version.release()

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
      except Exception:
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

