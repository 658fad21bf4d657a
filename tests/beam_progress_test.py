"""Tests for dropvar_tf.beam.progress: the in-process progress line.

They need only dropvar_tf (no `apache_beam`) and always run.
"""

import io

from dropvar_tf._keras import tf
from dropvar_tf.beam import progress


class ProgressTest(tf.test.TestCase):

  def test_one_line_rewritten_then_ended(self):
    stream = io.StringIO()
    progress.start("targets", stream)
    progress.add("computed", 2048)
    progress.add("skipped", 10)
    progress.add("computed", 1000)
    progress.finish()
    self.assertEqual(stream.getvalue(),
                     "\rtargets: 2,048 computed"
                     "\rtargets: 2,048 computed, 10 skipped"
                     "\rtargets: 3,048 computed, 10 skipped\n")

  def test_silent_unless_started(self):
    stream = io.StringIO()
    progress.start("targets", stream)
    progress.finish()
    progress.add("computed", 5)  # A worker process: nothing started.
    progress.finish()
    self.assertEqual(stream.getvalue(), "")


if __name__ == "__main__":
  tf.test.main()
