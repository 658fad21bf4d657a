"""Tests for dropvar_tf.beam.options: the pipelines' flags.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_options_test.py`) and are skipped, with the reason, elsewhere.
"""

import contextlib
import io
import unittest

from dropvar_tf._keras import tf
import beam_testing

if beam_testing.HAVE_BEAM:
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.options.pipeline_options import StandardOptions
  from dropvar_tf.beam import options

_TARGETS_DEFAULTS = {
    "model": None, "input": None, "output": None, "num_samples": 100,
    "seed": 0, "statistic": "auto", "batch_size": 256,
    "beam_batch_size": None, "num_shards": 8, "output_format": "tfrecord",
    "input_format": "auto", "key_feature": "key", "input_feature": None,
    "no_resume": False, "import_module": []}
_SCORING_DEFAULTS = {
    "saved_model": None, "input": None, "output": None,
    "output_format": "parquet", "input_format": "auto",
    "key_feature": "key", "batch_size": 256, "num_shards": 0,
    "signature": "serving_default"}
_ERR_REQUIRED = ("error: the following arguments are required: --model, "
                 "--output\n")


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class OptionsTest(tf.test.TestCase):

  def test_defaults(self):
    for cls, defaults in [(options.TargetsOptions, _TARGETS_DEFAULTS),
                          (options.ScoringOptions, _SCORING_DEFAULTS)]:
      parsed = cls([])
      for name, value in defaults.items():
        self.assertEqual(getattr(parsed, name), value, msg=(cls, name))

  def test_own_flags_and_beam_flags_in_one_argv(self):
    parsed = options.TargetsOptions([
        "--model", "m.keras", "--input", "a-*", "--input", "b-*",
        "--output", "out", "--num_samples", "4", "--no_resume",
        "--import_module", "my.layers", "--runner", "DirectRunner"])
    self.assertEqual(parsed.input, ["a-*", "b-*"])
    self.assertEqual(parsed.num_samples, 4)
    self.assertTrue(parsed.no_resume)
    self.assertEqual(parsed.import_module, ["my.layers"])
    self.assertEqual(parsed.view_as(StandardOptions).runner, "DirectRunner")

  def test_each_pipeline_parses_with_its_own_definitions(self):
    argv = ["--output_format", "jsonl", "--num_shards", "3"]
    self.assertEqual(options.ScoringOptions(argv).output_format, "jsonl")
    # Beam parses every options class against every argv: a scoring
    # format the targets pipeline lacks must not fail that parse.
    all_options = PipelineOptions(argv).get_all_options()
    self.assertEqual(all_options["output_format"], "jsonl")
    self.assertEqual(all_options["num_shards"], 3)
    # Python API runs pass only Beam's flags: no dropvar flag is required.
    PipelineOptions(["--runner", "DirectRunner"]).get_all_options()

  def test_require(self):
    parsed = options.TargetsOptions(["--input", "a-*"])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      with self.assertRaises(SystemExit) as ctx:
        options.require(parsed, options.TargetsOptions.REQUIRED)
    self.assertEqual(ctx.exception.code, 2)
    self.assertEndsWith(stderr.getvalue(), _ERR_REQUIRED)
    options.require(options.ScoringOptions(
        ["--saved_model", "s", "--input", "a", "--output", "o"]),
                    options.ScoringOptions.REQUIRED)

  def test_help_lists_the_flags_and_their_help(self):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      with self.assertRaises(SystemExit):
        options.TargetsOptions(["--help"])
    text = stdout.getvalue()
    self.assertIn("MC-dropout DPV targets with Apache Beam.", text)
    self.assertIn("--output_format {tfrecord,parquet}", text)
    self.assertIn("clear earlier shards instead of reusing them", text)
    self.assertNotIn("--saved_model", text)


if __name__ == "__main__":
  tf.test.main()
