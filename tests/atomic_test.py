"""Tests of dropvar_tf.atomic."""

import os
import tempfile

import numpy as np

from dropvar_tf import atomic
from dropvar_tf._keras import tf


class AtomicTest(tf.test.TestCase):

  def test_write_replaces_file(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(folder, "a.json")
    atomic.atomic_write(path, "old")
    atomic.atomic_write(path, b"new")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"new")
    self.assertEqual(os.listdir(folder), ["a.json"])

  def test_failed_block_keeps_old_file_and_leaves_no_temporary(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(folder, "values.npz")
    atomic.atomic_write(path, b"old")
    with self.assertRaisesRegex(RuntimeError, "disk full"):
      with atomic.atomic_path(path) as tmp:
        np.savez(tmp, x=np.arange(3))
        raise RuntimeError("disk full")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"old")
    self.assertEqual(os.listdir(folder), ["values.npz"])

  def test_temporary_path_keeps_the_extension(self):
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    for name, suffix in (("digits_r0.3_ab.npz", ".npz"),
                         ("base_r0.1.weights.h5", ".weights.h5"),
                         ("rows", "")):
      path = os.path.join(folder, name)
      with atomic.atomic_path(path) as tmp:
        self.assertEqual(os.path.dirname(tmp), folder)
        self.assertTrue(tmp.endswith(suffix))
        self.assertNotEqual(tmp, path)
        with open(tmp, "wb") as f:
          f.write(name.encode())
      with open(path, "rb") as f:
        self.assertEqual(f.read(), name.encode())


if __name__ == "__main__":
  tf.test.main()
