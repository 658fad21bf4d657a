"""Tests for dropvar_tf.beam.options: the pipelines' flags.

They need `apache_beam` (e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_options_test.py`) and are skipped, with the reason, elsewhere.
"""

import contextlib
import io
import os
import unittest
from unittest import mock

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
    "key_feature": "key", "batch_size": 256, "num_shards": 8,
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

  def test_unknown_and_mistyped_flags_are_a_usage_error(self):
    self.assertEqual(options.unknown_flags(
        ["--num_samples", "4", "--runner", "DirectRunner"]), [])
    self.assertEqual(
        options.unknown_flags(["--num-samples", "10", "--qqq"]),
        [("--num-samples", "--num_samples"), ("10", None),
         ("--qqq", None)])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      with self.assertRaises(SystemExit) as ctx:
        options.parse(options.TargetsOptions, [
            "--model", "m", "--input", "i", "--output", "o",
            "--num-samples", "10"])
    self.assertEqual(ctx.exception.code, 2)
    self.assertIn("error: unrecognized arguments: --num-samples (did you "
                  "mean --num_samples?) 10", stderr.getvalue())
    with self.assertRaisesRegex(ValueError, "`pipeline_args`"):
      options.launch_options(["--num-samples=3"], {})

  def test_runner_names_and_locality(self):
    cases = [([], "direct", True),
             (["--runner", "DirectRunner"], "direct", True),
             (["--runner", "PrismRunner"], "prism", True),
             (["--runner", "DataflowRunner"], "dataflow", False),
             (["--runner", "PortableRunner", "--job_endpoint", "embed"],
              "portable", True),
             (["--runner", "PortableRunner", "--job_endpoint",
               "localhost:8099"], "portable", True),
             (["--runner", "PortableRunner", "--job_endpoint",
               "jobs.example.com:8099"], "portable", False),
             (["--runner", "FlinkRunner"], "flink", True),
             (["--runner", "FlinkRunner", "--flink_master",
               "flink.example.com:8081"], "flink", False)]
    for argv, name, local in cases:
      parsed = PipelineOptions(argv)
      self.assertEqual(options.runner_name(parsed), name, msg=argv)
      self.assertEqual(options.is_local_runner(parsed), local, msg=argv)

  def test_check_runner_refuses_before_any_work(self):
    remote = PipelineOptions(["--runner", "FlinkRunner", "--flink_master",
                              "flink.example.com:8081"])
    options.check_runner(remote, {"inputs": ["gs://b/x-*"],
                                  "output": "hdfs://n/out"})
    with self.assertRaisesRegex(ValueError, "Invalid value received for "
                                "argument `output`. Expected a path every "
                                "flink worker can read"):
      options.check_runner(remote, {"inputs": ["gs://b/x-*"],
                                    "output": "/tmp/out"})
    options.check_runner(PipelineOptions([]), {"output": "/tmp/out"})
    dataflow = PipelineOptions(["--runner", "DataflowRunner"])
    with mock.patch.object(options, "_installed", return_value=False):
      with self.assertRaisesRegex(ValueError, r"pip install "
                                  r"'apache-beam\[gcp\]'"):
        options.check_runner(dataflow, {"output": "gs://b/out"})

  def test_normalize_path(self):
    self.assertEqual(options.normalize_path("out"),
                     os.path.join(os.getcwd(), "out"))
    self.assertEqual(options.normalize_path("./a/../out"),
                     os.path.join(os.getcwd(), "out"))
    self.assertEqual(options.normalize_path("gs://b/out"), "gs://b/out")

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
