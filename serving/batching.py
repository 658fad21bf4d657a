"""Server-side batching as TF Serving's `--enable_batching`.

Concurrent Predict requests for the same model version and signature are
merged into one run of the model and the outputs split back, the way TF
Serving's batching session does with its `BatchingParameters` (read from
`--batching_parameters_file`, the same text file):

- `max_batch_size`: the most examples in one run; a request with more is
  refused (INVALID_ARGUMENT "Task size N is larger than maximum input batch
  size M", TF's wording).
- `batch_timeout_micros`: how long the first request of a batch waits for
  others to join; 0 runs a batch as soon as a batch thread is free (so
  requests merge only while the model is busy).
- `num_batch_threads`: batches run at once.
- `max_enqueued_batches`: batches (the one still filling included) that may
  wait per version and signature, whatever their inner shapes; a request
  that would start one more is refused with UNAVAILABLE, TF's "The batch
  scheduling queue to which this task was submitted is full".
- `allowed_batch_sizes`: a merged batch is padded up to the next of these
  sizes (increasing, the last equal to `max_batch_size`) by repeating its
  first example, so only a few batch shapes are ever run; padding rows are
  dropped from the outputs.
- `pad_variable_length_inputs`: requests whose inputs differ in a non-batch
  dimension are merged by padding those dimensions up to the largest with
  the input's first value, as TF Serving does; without it they go to
  separate batches. Only meaningful for models that ignore the padding.

Where it differs: when a merged run fails (for example one request holds an
embedding id out of range), each request of the batch is run again on its
own, so only the faulty one is refused; TF Serving fails the whole batch.
`thread_pool_name`, `enable_large_batch_splitting` and
`max_execution_batch_size` are read but not used.
"""

import collections
import dataclasses
import os
import threading
import time

from absl import logging
import grpc
import numpy as np
from google.protobuf import text_format

from dropvar_tf import contract
from dropvar_tf.serving import errors
from dropvar_tf.serving import protos

# TF Serving's defaults for fields the file leaves out.
_DEFAULT_MAX_BATCH_SIZE = 1000
_DEFAULT_MAX_ENQUEUED_BATCHES = 10


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
  """The `BatchingParameters` the batcher uses.

  Attributes:
    max_batch_size: most examples in one run.
    batch_timeout_micros: longest wait of a batch's first request.
    num_batch_threads: batches running at once.
    max_enqueued_batches: batches that may wait per queue.
    allowed_batch_sizes: sizes a batch is padded up to; empty: no padding.
    pad_variable_length_inputs: merge inputs of different inner shapes.
  """
  max_batch_size: int = _DEFAULT_MAX_BATCH_SIZE
  batch_timeout_micros: int = 0
  num_batch_threads: int = os.cpu_count() or 1
  max_enqueued_batches: int = _DEFAULT_MAX_ENQUEUED_BATCHES
  allowed_batch_sizes: tuple = ()
  pad_variable_length_inputs: bool = False

  def __post_init__(self):
    for name in ("max_batch_size", "num_batch_threads",
                 "max_enqueued_batches"):
      value = getattr(self, name)
      if value < 1:
        raise ValueError(
            f"Invalid value received for argument `{name}`. Expected a value "
            f">= 1. Received: {name}={value}")
    if self.batch_timeout_micros < 0:
      raise ValueError(
          "Invalid value received for argument `batch_timeout_micros`. "
          "Expected a value >= 0. Received: "
          f"batch_timeout_micros={self.batch_timeout_micros}")
    sizes = list(self.allowed_batch_sizes)
    if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or
                  sizes[-1] != self.max_batch_size):
      raise ValueError(
          "Invalid value received for argument `allowed_batch_sizes`. "
          "Expected increasing sizes >= 1, the last equal to max_batch_size "
          f"({self.max_batch_size}). Received: allowed_batch_sizes={sizes}")


def read_batching_parameters(path):
  """Reads a `--batching_parameters_file` (text-format BatchingParameters).

  Args:
    path: the file.

  Returns:
    `BatchingOptions`, TF Serving's defaults for the fields left out.

  Raises:
    ValueError: the file cannot be read or parsed, or a value is invalid.
  """
  params = protos.BatchingParameters()
  try:
    with open(path) as f:
      text_format.Parse(f.read(), params)
  except (OSError, text_format.ParseError) as e:
    raise ValueError(
        f"Could not read batching parameters file {path}: {e}") from e
  kwargs = {}
  for name in ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
               "max_enqueued_batches"):
    if params.HasField(name):
      kwargs[name] = getattr(params, name).value
  kwargs["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
  kwargs["pad_variable_length_inputs"] = params.pad_variable_length_inputs
  try:
    return BatchingOptions(**kwargs)
  except ValueError as e:
    raise ValueError(f"Batching parameters file {path}: {e}") from e


class _Task:
  """One request waiting for its share of a batch's outputs."""

  def __init__(self, arrays, size):
    self.arrays = arrays
    self.size = size
    # A held lock as a one-shot latch: cheaper than an Event (a Condition
    # and a lock) when many handler threads wait at once.
    self._done = threading.Lock()
    self._done.acquire()
    self.outputs = None
    self.error = None

  def finish(self, outputs=None, error=None):
    self.outputs = outputs
    self.error = error
    self._done.release()

  def wait(self):
    self._done.acquire()


class _Queue:
  """The batches of one (version, signature, inner shapes).

  Attributes:
    fn: the signature's function.
    signature: (version, signature name): the key of the batch count that
      `max_enqueued_batches` bounds.
    open: the tasks of the batch still filling.
    open_size: its examples.
    deadline: when it runs even if not full.
    closed: full (or due) batches waiting for a batch thread.
  """

  def __init__(self, fn, signature):
    self.fn = fn
    self.signature = signature
    self.open = []
    self.open_size = 0
    self.deadline = None
    self.closed = collections.deque()

  def close_open(self):
    if self.open:
      self.closed.append(self.open)
      self.open, self.open_size, self.deadline = [], 0, None


def _pad_rows(array, rows):
  """`array` with its first example repeated to `rows` examples."""
  extra = rows - array.shape[0]
  if extra <= 0:
    return array
  return np.concatenate([array, np.repeat(array[:1], extra, axis=0)])


def _pad_inner(array, shape):
  """`array` padded with its first value up to `shape` (batch excluded)."""
  widths = [(0, 0)] + [(0, want - got)
                       for want, got in zip(shape, array.shape[1:])]
  if not any(w for _, w in widths):
    return array
  fill = array.flat[0] if array.size else 0
  return np.pad(array, widths, constant_values=fill)


class Batcher:
  """Merges concurrent runs of a signature into batches, on its own threads.

  `run` has the signature `servicers.ServingCore` expects of its `run`.
  """

  def __init__(self, options):
    """Creates the batcher; its threads start with `start`.

    Args:
      options: `BatchingOptions`.
    """
    self.options = options
    self._cv = threading.Condition()
    self._queues = {}
    # (version, signature name) -> batches waiting or filling, across the
    # queues of its inner shapes.
    self._enqueued = collections.Counter()
    self._stopped = False
    self._threads = []

  def start(self):
    """Starts `options.num_batch_threads` batch threads."""
    self._threads = [
        threading.Thread(target=self._work, daemon=True, name=f"batch-{i}")
        for i in range(self.options.num_batch_threads)
    ]
    for thread in self._threads:
      thread.start()

  def run(self, version, signature_name, fn, arrays):
    """Runs `fn` on `arrays` as part of a batch; blocks until done.

    Args:
      version: the `bundle.SavedModelBundle` (queues are per version).
      signature_name: the signature's key.
      fn: the signature's function, taking the inputs as keywords.
      arrays: {alias: numpy array}, batch first, already checked.

    Returns:
      {output alias: numpy array} for this request's examples.

    Raises:
      ServingError: INVALID_ARGUMENT for a request larger than
        max_batch_size, UNAVAILABLE when the queue is full.
      Exception: whatever `fn` raised for this request.
    """
    if signature_name == contract.MC_DROPOUT_SIGNATURE or not arrays:
      # mc_dropout's masks are keyed by row position in the batch: merged
      # behind another request, a request would get other masks. A
      # signature without inputs (the export's "metadata") has no batch.
      return {alias: np.asarray(value)
              for alias, value in fn(**arrays).items()}
    size = next(iter(arrays.values())).shape[0]
    max_size = self.options.max_batch_size
    if size > max_size:
      raise errors.invalid_argument(
          f"Task size {size} is larger than maximum input batch size "
          f"{max_size}")
    inner = () if self.options.pad_variable_length_inputs else tuple(
        (alias, a.shape[1:]) for alias, a in sorted(arrays.items()))
    signature = (version, signature_name)
    key = (signature, inner)
    task = _Task(arrays, size)
    with self._cv:
      if self._stopped:
        raise errors.ServingError(grpc.StatusCode.UNAVAILABLE,
                                  "The server is shutting down")
      queue = self._queues.get(key)
      if queue is None:
        queue = _Queue(fn, signature)
      if queue.open_size + size > max_size:
        queue.close_open()
        # A batch thread may be waiting for this batch's deadline.
        self._cv.notify()
      if not queue.open:
        if self._enqueued[signature] >= self.options.max_enqueued_batches:
          raise errors.ServingError(
              grpc.StatusCode.UNAVAILABLE,
              "The batch scheduling queue to which this task was submitted "
              "is full")
        self._enqueued[signature] += 1
        self._queues[key] = queue
        queue.deadline = (time.monotonic() +
                          self.options.batch_timeout_micros / 1e6)
        # A new deadline: wake a batch thread to wait for it. Requests that
        # join a filling batch wake nobody.
        self._cv.notify()
      queue.open.append(task)
      queue.open_size += size
      if queue.open_size == max_size:
        queue.close_open()
        self._cv.notify()
    task.wait()
    if task.error is not None:
      raise task.error
    return task.outputs

  def _next_batch(self):
    """Waits for a batch that is due; returns (queue, tasks) or None."""
    with self._cv:
      while not self._stopped:
        now = time.monotonic()
        wake = None
        for key, queue in list(self._queues.items()):
          if not queue.closed and queue.open and queue.deadline <= now:
            queue.close_open()
          if queue.closed:
            tasks = queue.closed.popleft()
            self._enqueued[queue.signature] -= 1
            if not self._enqueued[queue.signature]:
              del self._enqueued[queue.signature]
            if not queue.closed and not queue.open:
              del self._queues[key]
            return queue, tasks
          if queue.open:
            wake = queue.deadline if wake is None else min(wake,
                                                           queue.deadline)
        self._cv.wait(None if wake is None else max(wake - now, 0))
    return None

  def _work(self):
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      queue, tasks = batch
      try:
        self._run_batch(queue.fn, tasks)
      except Exception as e:
        if len(tasks) == 1:
          tasks[0].finish(error=e)
          continue
        logging.info("A merged batch of %d requests failed (%s); running "
                     "them one by one.", len(tasks), e)
        for task in tasks:
          try:
            self._run_batch(queue.fn, [task])
          except Exception as one:
            task.finish(error=one)

  def _run_batch(self, fn, tasks):
    """Runs `tasks` as one batch and hands each its outputs."""
    aliases = sorted(tasks[0].arrays)
    merged = {}
    for alias in aliases:
      parts = [t.arrays[alias] for t in tasks]
      if self.options.pad_variable_length_inputs and len(parts) > 1:
        shape = np.max([p.shape[1:] for p in parts], axis=0)
        parts = [_pad_inner(p, shape) for p in parts]
      merged[alias] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    total = sum(t.size for t in tasks)
    padded = next((s for s in self.options.allowed_batch_sizes
                   if s >= total), total)
    if padded > total:
      merged = {a: _pad_rows(v, padded) for a, v in merged.items()}
    outputs = {alias: np.asarray(value)
               for alias, value in fn(**merged).items()}
    for alias, value in outputs.items():
      if value.ndim == 0 or value.shape[0] != padded:
        raise errors.ServingError(
            grpc.StatusCode.INTERNAL,
            f"Batched output \"{alias}\" has shape {list(value.shape)}; its "
            f"first dimension must be the batch size {padded}")
    start = 0
    for task in tasks:
      task.finish({alias: value[start:start + task.size]
                   for alias, value in outputs.items()})
      start += task.size

  def stop(self):
    """Stops the batch threads once the batches already queued have run."""
    with self._cv:
      for queue in self._queues.values():
        queue.close_open()
      self._cv.notify_all()
    while True:
      with self._cv:
        if not self._queues:
          self._stopped = True
          self._cv.notify_all()
          break
      time.sleep(0.01)
    for thread in self._threads:
      thread.join(timeout=10)
