"""Tests for dropvar_tf.beam.flags: the pipelines' own flags, parsed first.

They need only dropvar_tf (no `apache_beam`) and always run.
"""

import contextlib
import io
import subprocess
import sys

from dropvar_tf._keras import tf
from dropvar_tf.beam import flags


def _run_module(module, argv):
  """stdout and stderr lines of `python -m module argv`, in a probe.

  The last stderr line is the exit status and which of tensorflow and
  apache_beam the process loaded.
  """
  probe = (
      "import runpy, sys\n"
      f"sys.argv = ['{module}'] + {list(argv)!r}\n"
      # What `python -m module argv` starts with.
      f"sys.orig_argv = [sys.executable, '-m', '{module}'] + {list(argv)!r}\n"
      "try:\n"
      f"  runpy.run_module('{module}', run_name='__main__')\n"
      "  code = 0\n"
      "except SystemExit as e:\n"
      "  code = e.code\n"
      "print(code, sorted(m for m in ('tensorflow', 'apache_beam') "
      "if m in sys.modules), file=sys.stderr)\n")
  done = subprocess.run([sys.executable, "-c", probe], check=True,
                        capture_output=True, text=True)
  return done.stdout, done.stderr.strip().splitlines()


class FlagsTest(tf.test.TestCase):

  def test_own_flags_parsed_beams_left_over(self):
    args, rest = flags.parse(flags.TARGETS, [
        "--model", "m.keras", "--input", "a-*", "--input", "b-*",
        "--output", "out", "--num_samples", "7", "--runner=DirectRunner",
        "--direct_num_workers", "2"])
    self.assertEqual(args.model, "m.keras")
    self.assertEqual(args.input, ["a-*", "b-*"])
    self.assertEqual(args.num_samples, 7)
    self.assertEqual(args.batch_size, 256)
    self.assertEqual(rest, ["--runner=DirectRunner", "--direct_num_workers",
                            "2"])
    args, rest = flags.parse(flags.SCORING, [
        "--saved_model", "m/1", "--input", "a", "--output", "o"])
    self.assertEqual((args.output_format, args.signature, rest),
                     ("parquet", "serving_default", []))

  def test_missing_and_bad_flags_are_usage_errors(self):
    for argv, message in [
        (["--model", "m"], "the following arguments are required: --input, "
         "--output"),
        (["--model", "m", "--input", "i", "--output", "o", "--seed", "x"],
         "argument --seed: invalid int value: 'x'"),
        (["--model", "m", "--input", "i", "--output", "o", "--statistic",
          "var"], "argument --statistic: invalid choice: 'var'"),
    ]:
      stderr = io.StringIO()
      with contextlib.redirect_stderr(stderr):
        with self.assertRaises(SystemExit) as ctx:
          flags.parse(flags.TARGETS, argv)
      self.assertEqual(ctx.exception.code, 2)
      self.assertIn(message, stderr.getvalue())

  def test_help_and_usage_errors_load_neither_tensorflow_nor_beam(self):
    for module in ("dropvar_tf.beam.targets_pipeline",
                   "dropvar_tf.beam.scoring_pipeline"):
      stdout, stderr = _run_module(module, ["--help"])
      self.assertIn("--input INPUT", stdout)
      self.assertIn("Beam's flags (--runner", stdout)
      self.assertEqual(stderr[-1], "0 []", msg=module)
      _, stderr = _run_module(module, ["--output", "o"])
      self.assertIn("the following arguments are required", stderr[-2])
      self.assertEqual(stderr[-1], "2 []", msg=module)


if __name__ == "__main__":
  tf.test.main()
