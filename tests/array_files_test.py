"""Tests for dropvar_tf.array_files."""

import os

import numpy as np

from dropvar_tf import array_files
from dropvar_tf._keras import tf


class ArrayFilesTest(tf.test.TestCase):

  def test_arrays_are_read(self):
    tmp = self.get_temp_dir()
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.save(os.path.join(tmp, "x.npy"), x)
    np.savez(os.path.join(tmp, "xy.npz"), x=x, color=np.array(["red", "a"]))
    self.assertAllEqual(array_files.load_npy(os.path.join(tmp, "x.npy")), x)
    named = array_files.load_npz(os.path.join(tmp, "xy.npz"))
    self.assertEqual(list(named), ["x", "color"])
    self.assertAllEqual(named["color"], ["red", "a"])

  def test_object_arrays_are_refused_naming_the_file(self):
    tmp = self.get_temp_dir()
    objects = np.array(["red", None], dtype=object)
    npy = os.path.join(tmp, "objects.npy")
    np.save(npy, objects)
    npz = os.path.join(tmp, "objects.npz")
    np.savez(npz, x=np.zeros(2), color=objects)
    hint = (" holds Python objects (dtype=object, e.g. strings from pandas), "
            "which are not read without pickle; save strings with a string "
            "dtype, e.g. np.asarray(column, dtype=str).")
    with self.assertRaisesWithLiteralMatch(ValueError, npy + hint):
      array_files.load_npy(npy)
    with self.assertRaisesWithLiteralMatch(
        ValueError, f"{npz}: array 'color'" + hint):
      array_files.load_npz(npz)


if __name__ == "__main__":
  tf.test.main()
