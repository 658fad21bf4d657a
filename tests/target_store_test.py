"""Tests for dropvar_tf.target_store (chunk files and manifest)."""

import json
import os
import tempfile

import numpy as np

from dropvar_tf import target_store
from dropvar_tf._keras import tf

_ERR_RESUME_SEED = (
    "Invalid value received for argument `output_path`. Expected a resume "
    "directory written with the same settings; its `seed` is 4, this run's "
    "is 5. Received: output_path='{path}'")

_SETTINGS = {"format_version": target_store.FORMAT_VERSION, "num_samples": 6,
             "seed": 4, "statistic": "std", "chunk_rows": 8}


class ChunkFileTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.path = tempfile.mkdtemp(dir=self.get_temp_dir())
    self.values = np.random.RandomState(0).rand(8, 3).astype(np.float32)
    self.inputs = target_store.input_digest(np.ones((8, 2)), np.arange(8))
    _, self.digest = target_store.prepare_output(self.path, _SETTINGS)

  def _write(self, index=1, start=8, stop=16):
    target_store.write_chunk(self.path, index, self.digest, start, stop,
                             self.inputs, self.values)

  def test_round_trip(self):
    self._write()
    values, inputs = target_store.read_chunk(self.path, 1, self.digest, 8, 16)
    self.assertAllEqual(values, self.values)
    self.assertEqual(values.dtype, np.float32)
    self.assertEqual(inputs, self.inputs)
    self.assertEqual(target_store.chunk_path(self.path, 1),
                     os.path.join(self.path, "chunk_000001.npz"))
    # Written atomically: no temporary file is left beside it.
    self.assertCountEqual(os.listdir(self.path),
                          ["chunk_000001.npz", "manifest.json"])

  def test_invalid_files_read_as_none(self):
    self.assertIsNone(
        target_store.read_chunk(self.path, 1, self.digest, 8, 16))  # Missing.
    self._write()
    self.assertIsNone(
        target_store.read_chunk(self.path, 1, self.digest, 0, 8))  # Range.
    self.assertIsNone(
        target_store.read_chunk(self.path, 1, "other", 8, 16))  # Settings.
    path = target_store.chunk_path(self.path, 1)
    with np.load(path) as data:
      fields = dict(data)
    fields["values"] = fields["values"] + 1.0  # A valid file, wrong values.
    with open(path, "wb") as f:
      np.savez(f, **fields)
    self.assertIsNone(
        target_store.read_chunk(self.path, 1, self.digest, 8, 16))
    self._write()
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    self.assertIsNone(
        target_store.read_chunk(self.path, 1, self.digest, 8, 16))

  def test_input_digest_covers_values_names_and_keys(self):
    x = {"a": np.arange(4), "b": np.ones((4, 2))}
    keys = np.arange(4)
    digest = target_store.input_digest(x, keys)
    self.assertEqual(
        digest, target_store.input_digest({"b": x["b"], "a": x["a"]}, keys))
    self.assertNotEqual(digest, target_store.input_digest(x, keys + 1))
    self.assertNotEqual(
        digest, target_store.input_digest({"a": x["a"] + 1, "b": x["b"]},
                                          keys))
    self.assertNotEqual(
        digest, target_store.input_digest({"c": x["a"], "b": x["b"]}, keys))
    self.assertNotEqual(
        digest, target_store.input_digest({"a": x["a"].astype(np.int32),
                                           "b": x["b"]}, keys))


class ManifestTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "run")

  def _manifest(self):
    with open(os.path.join(self.path, target_store.MANIFEST_FILENAME)) as f:
      return json.load(f)

  def test_new_directory_gets_the_settings(self):
    chunk_rows, digest = target_store.prepare_output(self.path, _SETTINGS)
    self.assertEqual(chunk_rows, 8)
    self.assertEqual(self._manifest(), _SETTINGS)
    self.assertLen(digest, 64)

  def test_resume_keeps_the_stored_chunk_rows(self):
    _, digest = target_store.prepare_output(self.path, _SETTINGS)
    chunk_rows, again = target_store.prepare_output(
        self.path, dict(_SETTINGS, chunk_rows=12))
    self.assertEqual(chunk_rows, 8)
    self.assertEqual(again, digest)
    self.assertEqual(self._manifest(), _SETTINGS)

  def test_other_settings_raise(self):
    target_store.prepare_output(self.path, _SETTINGS)
    with self.assertRaises(ValueError) as e:
      target_store.prepare_output(self.path, dict(_SETTINGS, seed=5))
    self.assertEqual(str(e.exception), _ERR_RESUME_SEED.format(path=self.path))

  def test_torn_manifest_is_rewritten(self):
    os.makedirs(self.path)
    with open(os.path.join(self.path, target_store.MANIFEST_FILENAME),
              "w") as f:
      f.write('{"seed": ')
    chunk_rows, _ = target_store.prepare_output(self.path, _SETTINGS)
    self.assertEqual(chunk_rows, 8)
    self.assertEqual(self._manifest(), _SETTINGS)


if __name__ == "__main__":
  tf.test.main()
