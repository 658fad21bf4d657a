"""Tests for dropvar_tf.beam.parts: the part file of each computed batch.

They need `apache_beam` (e.g. `.venv-beam`) and are skipped elsewhere.
"""

import os
import unittest

import numpy as np

from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  import apache_beam as beam
  from apache_beam.testing.util import assert_that
  from apache_beam.testing.util import equal_to

  from dropvar_tf.beam import parts


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class PartsTest(tf.test.TestCase):

  def test_round_trip_of_one_array_and_of_named_arrays(self):
    keys = np.array([3, 5, 8], np.int64)
    targets = np.array([0.5, 0.25, 0.125], np.float32)
    got_keys, got = parts.decode_part(parts.encode_part(keys, targets))
    self.assertAllEqual(got_keys, keys)
    self.assertAllEqual(got, targets)
    scores = {"prediction": np.ones((3, 2), np.float32),
              "variation": targets}
    got_keys, got = parts.decode_part(parts.encode_part(keys, scores),
                                      ["prediction", "variation"])
    self.assertAllEqual(got_keys, keys)
    self.assertAllEqual(got["prediction"], scores["prediction"])
    self.assertAllEqual(got["variation"], targets)
    # One array is stored as keys then targets, as earlier runs wrote it.
    self.assertEqual(parts.encode_part(keys, targets),
                     parts.encode_part(keys, {"target": targets}))

  def test_a_repeated_part_write_is_harmless(self):
    output = self.get_temp_dir()
    parts.make_parts_dir(output)
    keys = np.array([3, 5, 8], np.int64)
    values = np.array([0.5, 0.25, 0.125], np.float32)
    parts.write_part(output, keys, values)
    parts_dir = os.path.join(output, parts.PARTS_DIR)
    first = beam_testing.file_bytes(parts_dir)
    parts.write_part(output, keys, values)
    self.assertEqual(beam_testing.file_bytes(parts_dir), first)
    self.assertLen(first, 1)
    self.assertEqual(parts.existing_parts(output),
                     [os.path.join(parts_dir, parts.part_name(keys))])

  def test_done_parts_and_their_sorted_keys(self):
    output = self.get_temp_dir()
    parts.make_parts_dir(output)
    parts.write_part(output, np.array([9, 4]), np.zeros(2, np.float32))
    parts.write_part(output, np.array([1]), np.zeros(1, np.float32))
    for paths, expected in [(parts.existing_parts(output), [1, 4, 9]),
                            ([], [])]:
      with beam.Pipeline() as pipeline:
        _, keys = parts.done_parts(pipeline, paths)
        assert_that(keys | beam.Map(list), equal_to([expected]))


if __name__ == "__main__":
  tf.test.main()
