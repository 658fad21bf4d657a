"""Tiny seeded models and inputs shared by the Beam tests.

The pipeline tests need `apache_beam` (a venv with `dropvar_tf[beam]`, e.g.
`.venv-beam/bin/python -m pytest -q tests/beam_*_test.py`); elsewhere they
are skipped with `SKIP_REASON`.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
from unittest import mock

import numpy as np

from dropvar_tf._keras import keras

try:
  import apache_beam  # noqa: F401  (only whether it imports)
  HAVE_BEAM = True
except ImportError:
  HAVE_BEAM = False

SKIP_REASON = ("apache_beam is not installed: install dropvar_tf[beam] "
               "(e.g. in .venv-beam) to run the Beam pipeline tests")


def build_model(kind="regression", seed=0):
  """Tiny seeded base models.

  Args:
    kind: "regression" (input "features" (6,), MLP with two Dropouts, one
      output unit), "two_outputs" (the same input; a list of two outputs,
      "value" (one unit) and "klass" (3-class softmax)) or "dict" (inputs
      "user_id" () int64 and "dense" (3,), 3-class softmax).
    seed: seed of the weights.

  Returns:
    A Functional `keras.Model`.
  """
  keras.utils.set_random_seed(seed)
  if kind == "regression":
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(32, activation="relu")(x)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    h = keras.layers.Dropout(0.2)(h)
    return keras.Model(x, keras.layers.Dense(1)(h))
  if kind == "two_outputs":
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    h = keras.layers.Dropout(0.3)(h)
    value = keras.layers.Dense(1, name="value")(h)
    klass = keras.layers.Dense(3, activation="softmax", name="klass")(h)
    return keras.Model(x, [value, klass])
  user = keras.Input((), dtype="int64", name="user_id")
  dense = keras.Input((3,), name="dense")
  e = keras.layers.Flatten()(keras.layers.Embedding(20, 4)(user))
  h = keras.layers.Concatenate()([e, dense])
  # Named: Keras would call the first Dense layer "dense", the input's name.
  h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
  h = keras.layers.Dropout(0.4)(h)
  out = keras.layers.Dense(3, activation="softmax", name="probabilities")(h)
  return keras.Model({"user_id": user, "dense": dense}, out)


def regression_inputs(n, seed=0):
  """(n, 6) float32 inputs of the "regression" model."""
  return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def dict_inputs(n, seed=0):
  """n inputs of the "dict" model: {"user_id": (n,) int64, "dense": (n, 3)}."""
  rng = np.random.default_rng(seed)
  return {"user_id": rng.integers(0, 20, size=n).astype(np.int64),
          "dense": rng.normal(size=(n, 3)).astype(np.float32)}


def file_bytes(directory):
  """{file name: bytes} of the files in `directory` (not hidden ones)."""
  out = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path) and not name.startswith("."):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def killed_on_call(dofn_class, number):
  """Makes `dofn_class.process` raise "simulated kill" on its `number`-th call.

  A worker dying mid-run, for resume tests on in-process runners (the
  patched class is the one the runner calls).
  """
  original = dofn_class.process
  calls = []

  def process(fn_self, item):
    calls.append(1)
    if len(calls) == number:
      raise RuntimeError("simulated kill")
    yield from original(fn_self, item)

  with mock.patch.object(dofn_class, "process", process):
    yield


@contextlib.contextmanager
def portable_runner_args(timeout=60):
  """Beam flags of a PortableRunner run whose workers are other processes.

  Starts Beam's worker pool (`worker_pool_main`) in a subprocess; the job
  service is Beam's embedded one, in this process. For each job, the pool
  starts SDK harness processes, which get the pipeline through the
  portability API (Fn API), as workers of Flink, Spark or Dataflow do.

  Yields:
    The flags: `--runner=PortableRunner --job_endpoint=embed
    --environment_type=EXTERNAL --environment_config=localhost:<port>`.
  """
  port = _free_port()
  env = dict(os.environ)
  # The pool starts workers with `python` from PATH: this interpreter's.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get(
      "PATH", "")
  pool = subprocess.Popen(
      [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
       f"--service_port={port}"], env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + timeout
    while True:
      try:
        socket.create_connection(("localhost", port), timeout=1).close()
        break
      except OSError:
        if time.monotonic() > deadline or pool.poll() is not None:
          raise RuntimeError("Beam's worker pool did not start.") from None
        time.sleep(0.2)
    yield ["--runner=PortableRunner", "--job_endpoint=embed",
           "--environment_type=EXTERNAL",
           f"--environment_config=localhost:{port}"]
  finally:
    pool.terminate()
    pool.wait(timeout=30)
