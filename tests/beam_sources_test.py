"""Tests for dropvar_tf.beam.sources: matching, reading, decoding examples.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_sources_test.py`) and are skipped, with the reason, elsewhere.
"""

import gzip
import os
import re
import tempfile
import unittest

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.beam import records
import beam_testing

if beam_testing.HAVE_BEAM:
  import apache_beam as beam
  from apache_beam.testing.util import assert_that
  from dropvar_tf.beam import sources

_ERR_MIXED = ("Invalid value received for argument `input`. Expected files "
              "of one format (.npz or TFRecord)")


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class SourcesTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(dir=self.get_temp_dir())
    self.specs = records.model_input_specs(beam_testing.build_model("dict"))
    self.x = beam_testing.dict_inputs(10)
    self.keys = np.arange(100, 110, dtype=np.int64)

  def write_npz(self, name="ex.npz", **extra):
    path = os.path.join(self.root, name)
    np.savez(path, **self.x, **extra)
    return path

  def test_match_and_resolve_input_format(self):
    tfrecords = records.write_examples(os.path.join(self.root, "ex"), self.x,
                                       self.specs, num_shards=2)
    npz = self.write_npz()
    files = sources.match_inputs([os.path.join(self.root, "ex-*")])
    self.assertEqual([p for p, _ in files], sorted(tfrecords))
    self.assertEqual(sources.resolve_input_format("auto", files), "tfrecord")
    self.assertEqual(sources.resolve_input_format(
        "auto", sources.match_inputs([npz])), "npz")
    with self.assertRaisesRegex(ValueError, re.escape(_ERR_MIXED)):
      sources.resolve_input_format("auto", sources.match_inputs(
          [npz, os.path.join(self.root, "ex-*")]))
    with self.assertRaisesRegex(ValueError, "`input_format`"):
      sources.resolve_input_format("csv", files)
    with self.assertRaises(FileNotFoundError):
      sources.match_inputs([os.path.join(self.root, "none-*")])
    # Paths without wildcards are looked up one by one: the same result.
    self.assertEqual(sources.match_inputs(tfrecords), files)
    with self.assertRaisesRegex(FileNotFoundError, "none.tfrecord"):
      sources.match_inputs(tfrecords + [os.path.join(self.root,
                                                     "none.tfrecord")])

  def test_tfrecord_files_are_read_whole_with_their_checksums(self):
    path = records.write_examples(os.path.join(self.root, "ex"), self.x,
                                  self.specs, keys=self.keys)[0]
    with open(path, "rb") as f:
      data = f.read()
    expected = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    gz = os.path.join(self.root, "ex.tfrecord.gz")
    with gzip.open(gz, "wb") as f:
      f.write(data)
    for p in (path, gz):
      self.assertEqual(list(sources.ReadTFRecordFileFn().process(p)),
                       expected)
    for name, damaged, message in [
        ("flipped", data[:20] + bytes([data[20] ^ 1]) + data[21:],
         "a record that does not match its checksum"),
        ("cut", data[:-3], "ends inside a record"),
        ("header", data[:5], "ends inside a record header")]:
      bad = os.path.join(self.root, name)
      with open(bad, "wb") as f:
        f.write(damaged)
      with self.assertRaisesRegex(ValueError, message):
        list(sources.ReadTFRecordFileFn().process(bad))

  def test_npz_ranges_cover_every_row(self):
    npz = self.write_npz(key=self.keys)
    items = sources.npz_ranges([(npz, 0)], self.specs, "key", range_rows=4)
    self.assertEqual(items, [(npz, 0, 4, True), (npz, 4, 8, True),
                             (npz, 8, 10, True)])
    keyless = self.write_npz("keyless.npz")
    with self.assertRaisesRegex(ValueError, "in every .npz file"):
      sources.npz_ranges([(npz, 0), (keyless, 0)], self.specs, "key")

  def test_decode_batch_of_both_formats(self):
    (path,) = records.write_examples(os.path.join(self.root, "ex"), self.x,
                                     self.specs, keys=self.keys)
    serialized = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    rows = [(int(k), {n: v[i] for n, v in self.x.items()})
            for i, k in enumerate(self.keys)]
    for fmt, batch in [("tfrecord", serialized), ("npz", rows)]:
      keys, x = sources.decode_batch(batch, fmt, self.specs, "key")
      self.assertAllEqual(keys, self.keys, msg=fmt)
      for name in self.x:
        self.assertAllEqual(x[name], self.x[name], msg=(fmt, name))
        self.assertEqual(x[name].dtype, self.x[name].dtype, msg=(fmt, name))

  def test_keyed_examples(self):
    npz = self.write_npz(key=self.keys)
    tfrecords = records.write_examples(os.path.join(self.root, "ex"), self.x,
                                       self.specs, keys=self.keys,
                                       num_shards=3)
    expected = {int(k): {n: v[i].tolist() for n, v in self.x.items()}
                for i, k in enumerate(self.keys)}

    def check(got):
      got = {k: {n: v.tolist() for n, v in row.items()} for k, row in got}
      if got != expected:
        raise AssertionError(f"{got} != {expected}")

    for fmt, paths in [("npz", [npz]), ("tfrecord", tfrecords)]:
      with beam.Pipeline() as pipeline:
        keyed = sources.keyed_examples(
            pipeline, sources.match_inputs(paths), fmt, self.specs, "key",
            batch_size=4)
        assert_that(keyed, check)


if __name__ == "__main__":
  tf.test.main()
