"""Tests for dropvar_tf.study.cli (flags to a `StudyConfig`, main)."""

import dataclasses
from unittest import mock

from absl import flags

from dropvar_tf._keras import tf
from dropvar_tf.study import cli
from dropvar_tf.study import config as config_lib


class MakeConfigTest(tf.test.TestCase):

  def test_cli_config(self):
    config = cli.make_config(small=True, tasks=["digits"],
                             rates=["0.1", "0.5"], num_samples=4)
    self.assertEqual(config.tasks, ("digits",))
    self.assertEqual(config.dropout_rates, (0.1, 0.5))
    self.assertEqual(config.num_samples, 4)
    self.assertEqual(config.label, "small")
    with self.assertRaisesRegex(ValueError, "argument `rates`"):
      cli.make_config(rates=["x"])


class FlagsTest(tf.test.TestCase):

  def _flag_values(self, argv):
    values = flags.FlagValues()
    cli.define_flags(values)
    values(["study"] + argv)
    return values

  def test_help_states_the_config_defaults(self):
    values = self._flag_values([])
    full = config_lib.StudyConfig()
    self.assertIn(f"default {full.num_perturbed};",
                  values["num_perturbed"].help)
    self.assertIn(f"default {full.num_samples};", values["num_samples"].help)
    self.assertIn(f"default {full.head_epochs})", values["head_epochs"].help)

  def test_main_runs_the_study_of_the_flags(self):
    values = self._flag_values(["--small", "--tasks=digits", "--seed=3",
                                "--cache_dir=", "--output_dir=/tmp/x"])
    with mock.patch.object(cli, "FLAGS", values), \
         mock.patch.object(cli.runner, "run_study") as run_study:
      run_study.return_value = {"checks": [], "paths": {"report": "r.md"}}
      self.assertEqual(cli.main(["study"]), 0)
    run_study.assert_called_once()
    config, output_dir = run_study.call_args.args
    self.assertEqual(output_dir, "/tmp/x")
    self.assertEqual(config, dataclasses.replace(
        config_lib.small_config(), tasks=("digits",), seed=3))


if __name__ == "__main__":
  tf.test.main()
