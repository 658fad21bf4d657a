"""Tests for dropvar_tf.cli_help: the commands' quiet start and --help."""

import importlib
import os
import subprocess
import sys

from dropvar_tf._keras import tf


def _run(code, check=True):
  """A fresh process running `code`, as a user's shell starts the commands.

  That is without TF_CPP_MIN_LOG_LEVEL.
  """
  return subprocess.run(
      [sys.executable, "-c", code], check=check, capture_output=True,
      text=True, env={k: v for k, v in os.environ.items()
                      if k != "TF_CPP_MIN_LOG_LEVEL"})


def _stderr(code):
  """stderr of `_run(code)`."""
  return _run(code).stderr


class QuietStartTest(tf.test.TestCase):

  def test_native_stderr_is_dropped_inside_and_back_after(self):
    stderr = _stderr(
        "import os\n"
        "from dropvar_tf import cli_help\n"
        "with cli_help.native_stderr_silenced():\n"
        "  os.write(2, b'native line\\n')\n"
        "os.write(2, b'after\\n')\n")
    self.assertNotIn("native line", stderr)
    self.assertTrue(stderr.endswith("after\n"), stderr)

  def test_a_failed_import_still_raises_with_its_error_shown(self):
    with self.assertRaises(subprocess.CalledProcessError) as cm:
      subprocess.run([sys.executable, "-c",
                      "from dropvar_tf import cli_help\n"
                      "with cli_help.native_stderr_silenced():\n"
                      "  import no_such_module_here\n"],
                     check=True, capture_output=True, text=True)
    self.assertIn("No module named 'no_such_module_here'", cm.exception.stderr)

  def test_the_commands_print_no_tensorflow_start_up_lines(self):
    # As each console script starts: its name in sys.orig_argv, --help.
    for command, entry, module in [
        ("dropvar_export", "export_main", "dropvar_tf.export.export_cli"),
        ("dropvar_client", "client_main", "dropvar_tf.serving.client_cli"),
        ("dropvar_model_server", "server_main", "dropvar_tf.serving.server")]:
      with self.subTest(command=command):
        run = _run(
            "import sys\n"
            f"sys.orig_argv = [sys.executable, '/venv/bin/{command}', "
            "'--help']\n"
            f"sys.argv = ['{command}', '--help']\n"
            "from dropvar_tf import cli_help\n"
            f"cli_help.{entry}()\n", check=False)
        # The tool's usage and flags (absl's --help exits with 1), not a
        # crash.
        self.assertEqual(run.returncode, 1, run.stderr)
        self.assertStartsWith(run.stdout, importlib.import_module(
            module).__doc__.splitlines()[0])
        self.assertIn("--model", run.stdout)
        stderr = run.stderr
        self.assertNotIn("oneDNN", stderr)
        self.assertNotIn("absl::InitializeLog", stderr)
        self.assertNotIn("cuda", stderr.lower())


if __name__ == "__main__":
  tf.test.main()
