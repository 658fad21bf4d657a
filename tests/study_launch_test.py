"""Tests for dropvar_tf.study.launch: the `dropvar` command's quiet start."""

import os
import subprocess
import sys

from dropvar_tf._keras import tf


def _stderr(code):
  """stderr of a fresh process running `code`."""
  return subprocess.run([sys.executable, "-c", code], check=True,
                        capture_output=True, text=True).stderr


class LaunchTest(tf.test.TestCase):

  def test_native_stderr_is_dropped_inside_and_back_after(self):
    stderr = _stderr(
        "import os\n"
        "from dropvar_tf.study import launch\n"
        "with launch.native_stderr_silenced():\n"
        "  os.write(2, b'native line\\n')\n"
        "os.write(2, b'after\\n')\n")
    self.assertNotIn("native line", stderr)
    self.assertTrue(stderr.endswith("after\n"), stderr)

  def test_a_failed_import_still_raises_with_its_error_shown(self):
    with self.assertRaises(subprocess.CalledProcessError) as cm:
      subprocess.run([sys.executable, "-c",
                      "from dropvar_tf.study import launch\n"
                      "with launch.native_stderr_silenced():\n"
                      "  import no_such_module_here\n"],
                     check=True, capture_output=True, text=True)
    self.assertIn("No module named 'no_such_module_here'", cm.exception.stderr)

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
