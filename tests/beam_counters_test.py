"""Tests for dropvar_tf.beam.counters.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_counters_test.py`) and are skipped, with the reason, elsewhere.
"""

import unittest

from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  import apache_beam as beam
  from apache_beam.metrics import Metrics
  from dropvar_tf.beam import counters

  class CountFn(beam.DoFn):
    """Counts each element in the dropvar_tf namespace and in another one."""

    def __init__(self):
      self._seen = counters.counter("seen")
      self._other = Metrics.counter("elsewhere", "seen")

    def process(self, element):
      self._seen.inc(element)
      self._other.inc()
      yield element


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class CountersTest(tf.test.TestCase):

  def test_totals_sums_the_dropvar_tf_namespace(self):
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([1, 2, 3]) | beam.ParDo(CountFn())
    result = pipeline.run()
    result.wait_until_finish()
    self.assertEqual(counters.totals(result), {"seen": 6})


if __name__ == "__main__":
  tf.test.main()
