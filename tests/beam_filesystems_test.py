"""Tests for dropvar_tf.beam.filesystems: reads and atomic writes.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_filesystems_test.py`) and are skipped, with the reason, elsewhere.
"""

import os
import tempfile
import unittest
from unittest import mock

from dropvar_tf import atomic
from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  from dropvar_tf.beam import filesystems


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class FilesystemsTest(tf.test.TestCase):

  def test_is_local(self):
    self.assertTrue(filesystems.is_local("/tmp/x"))
    self.assertTrue(filesystems.is_local("relative/x"))
    self.assertFalse(filesystems.is_local("gs://bucket/x"))

  def test_local_atomic_write_replaces_and_leaves_no_temporary_file(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(folder, "manifest.json")
    filesystems.atomic_write(path, b"old")
    filesystems.atomic_write(path, b"new")
    self.assertEqual(filesystems.read_file_bytes(path), b"new")
    self.assertEqual(os.listdir(folder), ["manifest.json"])

  def test_local_atomic_write_goes_through_dropvar_tf_atomic(self):
    path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()),
                        "shard.tfrecord")
    with mock.patch.object(atomic, "atomic_write") as write:
      filesystems.atomic_write(path, b"data")
    write.assert_called_once_with(path, b"data")

  def test_remote_branch_renames_a_temporary_file(self):
    # Beam's FileSystems on local paths, as it would on gs:// or s3://.
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(folder, "shard.parquet")
    with mock.patch.object(filesystems, "is_local", return_value=False):
      filesystems.atomic_write(path, b"old")
      filesystems.atomic_write(path, b"new")
    self.assertEqual(filesystems.read_file_bytes(path), b"new")
    self.assertEqual(os.listdir(folder), ["shard.parquet"])

  def test_failed_write_keeps_the_old_file(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(folder, "settings.json")
    filesystems.atomic_write(path, b"old")
    with self.assertRaises(TypeError):
      filesystems.atomic_write(path, 12)
    self.assertEqual(filesystems.read_file_bytes(path), b"old")
    self.assertEqual(os.listdir(folder), ["settings.json"])


if __name__ == "__main__":
  tf.test.main()
