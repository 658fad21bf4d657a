"""Tests for dropvar_tf.study.launch: the `dropvar` command's quiet start."""

import os
import subprocess
import sys

from dropvar_tf._keras import tf


class LaunchTest(tf.test.TestCase):

  def test_the_command_prints_no_tensorflow_start_up_lines(self):
    # As the `dropvar` console script starts, without TF_CPP_MIN_LOG_LEVEL.
    stderr = subprocess.run(
        [sys.executable, "-c",
         "import sys\n"
         "sys.orig_argv = [sys.executable, '/venv/bin/dropvar', '--help']\n"
         "sys.argv = ['dropvar', '--help']\n"
         "from dropvar_tf.study import launch\n"
         "launch.run_main()\n"],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items()
             if k != "TF_CPP_MIN_LOG_LEVEL"}).stderr
    self.assertNotIn("oneDNN", stderr)
    self.assertNotIn("absl::InitializeLog", stderr)


if __name__ == "__main__":
  tf.test.main()
