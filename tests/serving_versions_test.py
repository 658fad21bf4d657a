"""Tests of serving/versions.py: version folders, policies and resolution."""

import os
import shutil
import tempfile
from unittest import mock

import grpc
import numpy as np

from dropvar_tf import contract
from dropvar_tf._keras import tf
from dropvar_tf.serving import bundle
from dropvar_tf.serving import errors
from dropvar_tf.serving import server as server_lib
from dropvar_tf.serving import versions
import serving_testing as testing
import testing_models as tm
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_pb2

_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.END


def _spec(name="m", version=None, label=None):
  spec = model_pb2.ModelSpec(name=name)
  if version is not None:
    spec.version.value = version
  if label is not None:
    spec.version_label = label
  return spec


class VersionsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = tempfile.mkdtemp()
    model = tm.dual_dense_model()
    for version in (1, 2, 3):
      testing.write_export(model, cls.base, version)

  def _new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def _served(self, **labels):
    config = server_lib.model_config("m", self.base)
    config.version_labels.update(labels)
    served = versions.ServedModel(config)
    served.poll()
    return served

  def assertServingError(self, call, code, message):
    with self.assertRaises(errors.ServingError) as cm:
      call()
    self.assertEqual(cm.exception.code, code)
    self.assertEqual(cm.exception.message, message)

  def test_list_versions_skips_what_is_not_a_version(self):
    base = self._new_dir()
    testing.write_export(tm.dual_dense_model(), base, 4)
    os.makedirs(os.path.join(base, ".tmp-9-abc"))
    os.makedirs(os.path.join(base, "8", "variables"))
    os.makedirs(os.path.join(base, "7.tmp"))
    os.makedirs(os.path.join(base, "\u0665"))  # An Arabic-Indic digit 5.
    with open(os.path.join(base, "6"), "w") as f:
      f.write("not a folder")
    # Not an int64: TF Serving skips it; it must not replace version 4.
    testing.write_export(tm.dual_dense_model(), base, 2**63)
    self.assertEqual(versions.list_versions(base),
                     {4: os.path.join(base, "4")})
    with self.assertRaises(OSError):
      versions.list_versions(os.path.join(base, "nope"))

  def test_specific_and_all_version_policies(self):
    specific = server_lib.model_config("m", self.base)
    specific.model_version_policy.specific.versions.extend([1, 3])
    served = versions.ServedModel(specific)
    served.poll()
    self.assertEqual([v for v, *_ in served.status()], [1, 3])
    every = server_lib.model_config("m", self.base)
    every.model_version_policy.all.SetInParent()
    served = versions.ServedModel(every)
    served.poll()
    self.assertEqual([v for v, *_ in served.status()], [1, 2, 3])

  def test_latest_policy_loads_the_newest(self):
    served = self._served()
    self.assertEqual(served.status(), [(3, _AVAILABLE, 0, "")])

  def test_resolve_latest_version_and_label(self):
    served = self._served(stable=3, canary=2)
    self.assertEqual(served.resolve(_spec()).version, 3)
    self.assertEqual(served.resolve(_spec(version=3)).version, 3)
    self.assertEqual(served.resolve(_spec(label="stable")).version, 3)
    fn, specs, signature_def = served.resolve(_spec()).signature(
        contract.SERVING_SIGNATURE)
    self.assertTrue(callable(fn))
    self.assertEqual(specs["x"].dims, (-1, tm.DUAL_DENSE_FEATURES))
    self.assertEqual(set(signature_def.outputs), set(contract.OUTPUT_KEYS))

  def test_resolution_errors(self):
    served = self._served(canary=2)
    not_found = grpc.StatusCode.NOT_FOUND
    cases = [
        ("version not loaded", lambda: served.resolve(_spec(version=2)),
         not_found, "Servable not found for request: Specific(m, 2)"),
        ("label of a version not loaded",
         lambda: served.resolve(_spec(label="canary")), not_found,
         "Servable not found for request: Specific(m, 2)"),
        ("unknown label", lambda: served.resolve(_spec(label="nope")),
         grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: nope"),
        ("status of an unknown version", lambda: served.status(9),
         not_found, "Could not find version 9 of model m"),
        ("unknown signature",
         lambda: served.resolve(_spec()).signature("nope"),
         grpc.StatusCode.FAILED_PRECONDITION,
         "Serving signature key \"nope\" not found."),
    ]
    for name, call, code, message in cases:
      with self.subTest(name):
        self.assertServingError(call, code, message)

  def test_nothing_loaded(self):
    served = versions.ServedModel(
        server_lib.model_config("m", self._new_dir()))
    served.poll()
    self.assertServingError(lambda: served.resolve(_spec()),
                            grpc.StatusCode.NOT_FOUND,
                            "Servable not found for request: Latest(m)")
    self.assertServingError(served.status, grpc.StatusCode.NOT_FOUND,
                            "Could not find any versions of model m")

  def test_broken_version_is_given_up_after_its_attempts(self):
    base = self._new_dir()
    broken = os.path.join(base, "1")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
      f.write(b"this is not a SavedModel")
    served = versions.ServedModel(server_lib.model_config("m", base),
                                  max_load_attempts=2,
                                  retry_backoff_seconds=0)
    with mock.patch.object(bundle, "SavedModelBundle",
                           wraps=bundle.SavedModelBundle) as load:
      for _ in range(4):
        served.poll()
    self.assertEqual(load.call_count, 2)
    ((version, state, code, message),) = served.status()
    self.assertEqual((version, state, code),
                     (1, _END, grpc.StatusCode.UNKNOWN.value[0]))
    self.assertStartsWith(message, "Loading failed: ")

  def _broken_export(self, base, version):
    path = os.path.join(base, str(version))
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
      f.write(b"this is not a SavedModel")
    return path

  def test_base_path_gone_for_a_moment_keeps_serving(self):
    base = os.path.join(self._new_dir(), "m")
    testing.write_export(tm.dual_dense_model(), base, 1)
    served = versions.ServedModel(server_lib.model_config("m", base))
    served.poll()
    os.rename(base, base + ".moved")
    with self.assertLogs(level="ERROR") as logs:
      served.poll()
    self.assertIn(base, logs.output[0])
    self.assertEqual(served.resolve(_spec()).version, 1)
    self.assertEqual(served.status(), [(1, _AVAILABLE, 0, "")])
    os.rename(base + ".moved", base)
    served.poll()
    self.assertEqual(served.resolve(_spec()).version, 1)

  def test_unloaded_version_closes_its_session_after_its_last_request(self):
    base = os.path.join(self._new_dir(), "m")
    model = tm.dual_dense_model()
    testing.write_export(model, base, 1)
    served = versions.ServedModel(server_lib.model_config("m", base))
    served.poll()
    x = np.ones((2, tm.DUAL_DENSE_FEATURES), np.float32)
    with served.use(_spec()) as held:
      fn, _, _ = held.signature(contract.SERVING_SIGNATURE)
      want = fn(x=x)
      testing.write_export(model, base, 2)
      served.poll()
      self.assertEqual(served.loaded_versions, [2])
      # Still held by this request: its Session answers.
      self.assertAllClose(fn(x=x), want)
    with self.assertRaisesRegex(tf.errors.CancelledError,
                                "Session has been closed"):
      fn(x=x)

  def test_unloaded_version_unused_closes_at_once_and_is_not_taken(self):
    base = os.path.join(self._new_dir(), "m")
    model = tm.dual_dense_model()
    testing.write_export(model, base, 1)
    served = versions.ServedModel(server_lib.model_config("m", base))
    served.poll()
    # A request that resolved version 1 just before it was unloaded.
    stale = served.resolve(_spec())
    fn, _, _ = stale.signature(contract.SERVING_SIGNATURE)
    testing.write_export(model, base, 2)
    served.poll()
    x = np.ones((1, tm.DUAL_DENSE_FEATURES), np.float32)
    with self.assertRaisesRegex(tf.errors.CancelledError,
                                "Session has been closed"):
      fn(x=x)
    self.assertFalse(stale.acquire())
    with served.use(_spec()) as held:
      self.assertEqual(held.version, 2)

  def test_failed_load_is_retried_with_backoff(self):
    base = self._new_dir()
    self._broken_export(base, 1)
    served = versions.ServedModel(server_lib.model_config("m", base),
                                  max_load_attempts=3,
                                  retry_backoff_seconds=10)
    now = [1000.0]
    with mock.patch.object(versions.time, "monotonic", lambda: now[0]):
      with mock.patch.object(bundle, "SavedModelBundle",
                             wraps=bundle.SavedModelBundle) as load:
        served.poll()
        served.poll()
        self.assertEqual(load.call_count, 1)
        now[0] += 10
        served.poll()
        served.poll()
        self.assertEqual(load.call_count, 2)
        now[0] += 19
        served.poll()
        self.assertEqual(load.call_count, 2)
        now[0] += 1
        served.poll()
        self.assertEqual(load.call_count, 3)
        now[0] += 1000
        served.poll()
        self.assertEqual(load.call_count, 3)

  def test_failed_version_loads_once_its_folder_is_fixed(self):
    # A slow `cp -r` is loaded half-written and fails every attempt; once
    # the copy is complete (or published again) the version must load.
    base = self._new_dir()
    broken = self._broken_export(base, 1)
    served = versions.ServedModel(server_lib.model_config("m", base),
                                  max_load_attempts=1,
                                  retry_backoff_seconds=0)
    served.poll()
    served.poll()
    self.assertEqual(served.status()[0][1], _END)
    shutil.rmtree(broken)
    staging = self._new_dir()
    testing.write_export(tm.dual_dense_model(), staging, 1)
    os.rename(os.path.join(staging, "1"), broken)
    served.poll()
    self.assertEqual(served.status(), [(1, _AVAILABLE, 0, "")])
    self.assertEqual(served.resolve(_spec()).version, 1)

  def test_manager_refuses_bad_configs_and_unknown_models(self):
    config = server_lib.model_config("m", self.base)
    with self.assertRaisesRegex(ValueError, "Model 'm' is configured twice."):
      versions.ModelManager([config, config])
    other = server_lib.model_config("m", self.base)
    other.model_platform = "pytorch"
    with self.assertRaisesRegex(ValueError, "only model_platform "
                                "'tensorflow' is served; got 'pytorch'."):
      versions.ModelManager([other])
    manager = versions.ModelManager([config], poll_seconds=0)
    self.assertServingError(lambda: manager.get(_spec("nope")),
                            grpc.StatusCode.NOT_FOUND,
                            "Servable not found for request: Latest(nope)")
    self.assertServingError(lambda: manager.get(_spec("nope", version=4)),
                            grpc.StatusCode.NOT_FOUND,
                            "Servable not found for request: Specific(nope, "
                            "4)")
    manager.start()
    self.addCleanup(manager.stop)
    self.assertEqual(manager.get(_spec()).resolve(_spec()).version, 3)


if __name__ == "__main__":
  tf.test.main()
