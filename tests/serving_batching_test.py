"""Tests of serving/batching.py: merged runs, padding, limits, end to end."""

import os
import shutil
import tempfile
import threading
from concurrent import futures
from unittest import mock

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import batching
from dropvar_tf.serving import errors
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import prediction_service_pb2_grpc

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 20.0


class _Recorder:
  """A signature function that doubles `x` and records the batch sizes."""

  def __init__(self, fail_on=None):
    self.sizes = []
    self.fail_on = fail_on
    self.lock = threading.Lock()

  def __call__(self, x):
    with self.lock:
      self.sizes.append(x.shape[0])
    if self.fail_on is not None and np.any(x == self.fail_on):
      raise tf.errors.InvalidArgumentError(None, None, "bad value")
    return {"y": tf.constant(x * 2), "n": tf.constant(x[:, :1])}


class BatcherTest(tf.test.TestCase):

  def _batcher(self, **kwargs):
    batcher = batching.Batcher(batching.BatchingOptions(**kwargs))
    batcher.start()
    self.addCleanup(batcher.stop)
    return batcher

  def _submit_concurrently(self, batcher, fn, arrays_list):
    with futures.ThreadPoolExecutor(len(arrays_list)) as pool:
      jobs = [pool.submit(batcher.run, "v", "sig", fn, {"x": a})
              for a in arrays_list]
      return [job.exception() or job.result() for job in jobs]

  def test_concurrent_requests_merge_and_split_back(self):
    batcher = self._batcher(max_batch_size=16, batch_timeout_micros=200000,
                            num_batch_threads=1)
    fn = _Recorder()
    arrays = [np.full((1, 3), i, np.float32) for i in range(8)]
    results = self._submit_concurrently(batcher, fn, arrays)
    for array, result in zip(arrays, results):
      self.assertAllEqual(result["y"], array * 2)
      self.assertAllEqual(result["n"], array[:, :1])
    self.assertLess(len(fn.sizes), 8)
    self.assertEqual(sum(fn.sizes), 8)

  def test_padding_to_allowed_batch_sizes(self):
    batcher = self._batcher(max_batch_size=8, allowed_batch_sizes=(4, 8),
                            num_batch_threads=1)
    fn = _Recorder()
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    result = batcher.run("v", "sig", fn, {"x": x})
    self.assertEqual(fn.sizes, [4])
    self.assertAllEqual(result["y"], x * 2)

  def test_limits(self):
    batcher = self._batcher(max_batch_size=4)
    with self.assertRaises(errors.ServingError) as cm:
      batcher.run("v", "sig", _Recorder(), {"x": np.zeros((5, 3))})
    self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertEqual(cm.exception.message, "Task size 5 is larger than "
                     "maximum input batch size 4")
    with self.assertRaisesRegex(ValueError, "the last equal to "
                                "max_batch_size"):
      batching.BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4,))

  def test_queue_never_holds_more_than_max_enqueued_batches(self):
    # One batch thread, held busy by the first batch; batches of 1 example.
    batcher = self._batcher(max_batch_size=1, num_batch_threads=1,
                            max_enqueued_batches=2)
    release = threading.Event()
    started = threading.Event()

    def blocking(x):
      started.set()
      release.wait(_TIMEOUT)
      return {"y": tf.constant(x * 2)}

    with futures.ThreadPoolExecutor(8) as pool:
      running = pool.submit(batcher.run, "v", "sig", blocking,
                            {"x": np.zeros((1, 3))})
      self.assertTrue(started.wait(_TIMEOUT))
      # Inner shapes 3 and 4 go to separate queues of one signature: the
      # bound is per version and signature, as TF Serving's one queue.
      shapes = [3, 4, 4, 3, 3]
      accepted, refused = [], []
      for n in shapes:
        job = pool.submit(batcher.run, "v", "sig", blocking,
                          {"x": np.zeros((1, n))})
        try:
          refused.append(job.exception(timeout=0.3))
        except futures.TimeoutError:  # Waiting in the queue.
          accepted.append(job)
      self.assertLen(accepted, 2)
      self.assertLen(refused, len(shapes) - 2)
      for error in refused:
        self.assertIsInstance(error, errors.ServingError)
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(error.message, "The batch scheduling queue to which "
                         "this task was submitted is full")
      release.set()
      self.assertAllEqual(running.result(_TIMEOUT)["y"], np.zeros((1, 3)))
      for job, n in zip(accepted, [3, 4]):
        self.assertAllEqual(job.result(_TIMEOUT)["y"], np.zeros((1, n)))

  def test_mc_dropout_requests_are_never_merged(self):
    # Their masks are keyed by row position: merging would change them.
    batcher = self._batcher(max_batch_size=16, batch_timeout_micros=200000,
                            num_batch_threads=1)
    fn = _Recorder()
    arrays = [np.full((1, 3), i, np.float32) for i in range(4)]
    with futures.ThreadPoolExecutor(4) as pool:
      jobs = [pool.submit(batcher.run, "v", contract.MC_DROPOUT_SIGNATURE,
                          fn, {"x": a}) for a in arrays]
      results = [job.result() for job in jobs]
    self.assertEqual(fn.sizes, [1, 1, 1, 1])
    for array, result in zip(arrays, results):
      self.assertAllEqual(result["y"], array * 2)

  def test_requests_after_stop_are_refused(self):
    batcher = batching.Batcher(batching.BatchingOptions(max_batch_size=4))
    batcher.start()
    batcher.stop()
    with self.assertRaises(errors.ServingError) as cm:
      batcher.run("v", "sig", _Recorder(), {"x": np.zeros((1, 3))})
    self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)

  def test_a_failing_request_does_not_fail_its_batch_mates(self):
    batcher = self._batcher(max_batch_size=16, batch_timeout_micros=200000,
                            num_batch_threads=1)
    fn = _Recorder(fail_on=-1.0)
    arrays = [np.full((1, 3), i, np.float32) for i in range(4)]
    arrays[2] = np.full((1, 3), -1.0, np.float32)
    results = self._submit_concurrently(batcher, fn, arrays)
    self.assertIsInstance(results[2], tf.errors.InvalidArgumentError)
    for i in (0, 1, 3):
      self.assertAllEqual(results[i]["y"], arrays[i] * 2)

  def test_variable_length_inputs(self):
    fn = _Recorder()
    arrays = [np.ones((1, 2), np.float32), np.ones((1, 3), np.float32)]
    separate = self._batcher(max_batch_size=8, batch_timeout_micros=200000,
                             num_batch_threads=1)
    results = self._submit_concurrently(separate, fn, arrays)
    self.assertEqual(sorted(fn.sizes), [1, 1])
    self.assertEqual(results[0]["y"].shape, (1, 2))
    fn = _Recorder()
    padded = self._batcher(max_batch_size=8, batch_timeout_micros=200000,
                           num_batch_threads=1,
                           pad_variable_length_inputs=True)
    results = self._submit_concurrently(padded, fn, arrays)
    self.assertEqual(fn.sizes, [2])
    self.assertEqual(results[0]["y"].shape, (1, 3))

  def test_deploy_batching_parameters_parse(self):
    options = batching.read_batching_parameters(os.path.join(
        _REPO_ROOT, "serving", "deploy", "batching_parameters.txt"))
    self.assertEqual(options, batching.BatchingOptions(
        max_batch_size=256, batch_timeout_micros=1000, num_batch_threads=4,
        max_enqueued_batches=100, allowed_batch_sizes=(8, 32, 128, 256)))
    path = os.path.join(self.get_temp_dir(), "bad.txt")
    with open(path, "w") as f:
      f.write("max_batch_size: 3")
    with self.assertRaisesRegex(ValueError, "Could not read batching"):
      batching.read_batching_parameters(path)


class BatchingServerTest(tf.test.TestCase):

  def test_batched_outputs_equal_unbatched(self):
    base = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, base, ignore_errors=True)
    model = tm.dual_ratings_model(seed=4)
    testing.write_export(model, base, 1)
    servers = {}
    for name, options in (("plain", None), ("batched",
                                            batching.BatchingOptions(
                                                max_batch_size=32,
                                                batch_timeout_micros=20000,
                                                num_batch_threads=2,
                                                allowed_batch_sizes=(8, 32)))):
      server = server_lib.ModelServer(
          [server_lib.model_config("m", base)], poll_seconds=0,
          max_workers=16, batching=options)
      server.start()
      self.addCleanup(server.stop)
      servers[name] = server
    requests = [testing.predict_request("m", testing.ratings_inputs(
        1 + i % 3, seed=i)) for i in range(32)]
    batcher = servers["batched"].batcher
    runs = mock.patch.object(batcher, "_run_batch", wraps=batcher._run_batch)
    answers = {}
    with runs as run_batch:
      for name, server in servers.items():
        with grpc.insecure_channel(server.target) as channel:
          stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
          with futures.ThreadPoolExecutor(16) as pool:
            answers[name] = list(pool.map(
                lambda r, s=stub: s.Predict(r, timeout=_TIMEOUT), requests))
    # Merged: fewer runs than requests.
    self.assertLess(run_batch.call_count, len(requests))
    for plain, batched in zip(answers["plain"], answers["batched"]):
      for key in contract.OUTPUT_KEYS:
        self.assertAllClose(tf.make_ndarray(batched.outputs[key]),
                            tf.make_ndarray(plain.outputs[key]),
                            rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
  tf.test.main()
