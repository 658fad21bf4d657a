"""Tests for dropvar_tf.beam.batches: fixed batches by key rank.

They need `apache_beam` (e.g. `.venv-beam`) and are skipped elsewhere.
"""

import unittest

import numpy as np

from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  import apache_beam as beam
  from apache_beam.testing.util import assert_that
  from apache_beam.testing.util import equal_to

  from dropvar_tf.beam import batches
  from dropvar_tf.beam import records


def _batches_of(raws, done, rows, input_format="npz", flags=()):
  """Sorted key lists of the work items of `raws`, one run."""
  with beam.Pipeline(argv=list(flags)) as pipeline:
    done_keys = pipeline | "Done" >> beam.Create([np.array(done, np.int64)])
    items = batches.work_items(pipeline | beam.Create(raws), input_format,
                               "key", done_keys, rows)
    assert_that(items | beam.MapTuple(
        lambda batch_id, elements: (batch_id, sorted(
            key for key, _ in elements))), equal_to(_expected(raws, done,
                                                              rows)))


def _expected(raws, done, rows):
  keys = sorted(k for k, _ in raws if k not in done) if isinstance(
      raws[0], tuple) else None
  return [(i // rows, keys[i:i + rows]) for i in range(0, len(keys), rows)]


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class BatchesTest(tf.test.TestCase):

  def test_batches_by_key_rank_whatever_the_bundles(self):
    rng = np.random.default_rng(0)
    keys = rng.choice(10**6, size=50, replace=False).tolist()
    raws = [(k, {"x": np.float32(k)}) for k in keys]
    done = keys[:7]
    for flags in ([], ["--direct_num_workers=2",
                       "--direct_running_mode=multi_threading"]):
      _batches_of(raws, done, rows=8, flags=flags)

  def test_tfrecord_keys_are_parsed_from_the_examples(self):
    specs = {"kind": "dict", "inputs": [["x", "float32", [1]]]}
    serialized = [records.serialize_example({
        "key": records._feature([k], tf.int64),
        "x": records._feature([0.5], tf.float32)}) for k in (5, 3, 9, 1)]
    self.assertAllEqual(batches.raw_keys(serialized, "tfrecord", "key"),
                        [5, 3, 9, 1])
    self.assertEqual(records.parse_examples(serialized, specs)[0].tolist(),
                     [5, 3, 9, 1])


if __name__ == "__main__":
  tf.test.main()
