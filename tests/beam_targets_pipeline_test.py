"""Tests for dropvar_tf.beam.targets_pipeline.

They need `apache_beam` (run them in a venv with `dropvar_tf[beam]`, e.g.
`.venv-beam/bin/python -m pytest -q tests/beam_targets_pipeline_test.py`);
they are skipped, with the reason, elsewhere.

Exactness: the pipeline pads every compute batch to `batch_size` rows, as
`mc_dropout_targets` pads its own last batch, and passes each example's key,
so each example meets the same masks in compiled calls of the same shapes:
the targets are compared for bitwise equality, not to a tolerance.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np

from dropvar_tf import targets
from dropvar_tf._keras import tf
from dropvar_tf.beam import records
import beam_testing

if beam_testing.HAVE_BEAM:
  from dropvar_tf.beam import parts
  from dropvar_tf.beam import targets_pipeline
  from dropvar_tf.beam import targets_transforms

_NUM_SAMPLES = 8
_SEED = 7
_BATCH = 64
_ERR_OTHER_SETTINGS = (
    "Invalid value received for argument `output`. Expected a directory "
    "written with the same settings, or resume=False; its `seed` is 7, this "
    "run's is 8")


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class TargetsPipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="beam_targets_test_")
    cls.model = beam_testing.build_model()
    cls.model_path = os.path.join(cls.root, "model.keras")
    cls.model.save(cls.model_path)
    cls.n = 2000
    cls.x = beam_testing.regression_inputs(cls.n)
    cls.specs = records.model_input_specs(cls.model)
    cls.files = records.write_examples(os.path.join(cls.root, "ex", "ex"),
                                       cls.x, cls.specs, num_shards=3)
    cls.reference = targets.mc_dropout_targets(
        cls.model, cls.x, num_samples=_NUM_SAMPLES, seed=_SEED,
        batch_size=_BATCH)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def run_pipeline(self, output, inputs=None, **kwargs):
    args = dict(num_samples=_NUM_SAMPLES, seed=_SEED, batch_size=_BATCH,
                num_shards=4)
    args.update(kwargs)
    return targets_pipeline.run_targets_pipeline(
        self.model_path, inputs or os.path.join(self.root, "ex", "ex-*"),
        output, **args)

  def test_equals_mc_dropout_targets_exactly(self):
    output = self.new_dir()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      summary = self.run_pipeline(output, show_progress=True)
    self.assertEndsWith(stderr.getvalue(), "2,000 computed\n")
    self.assertEqual(summary["examples_computed"], self.n)
    # Items of 512 keys by rank: only the last (464 rows) pads, to 512.
    self.assertEqual(summary["examples_padded"], 48)
    self.assertEqual(summary["manifest"]["num_keys"], self.n)
    self.assertEqual(summary["manifest"]["statistic"], "std")
    keys, values = records.read_targets(output)
    self.assertAllEqual(keys, np.arange(self.n))
    self.assertEqual(values.dtype, np.float32)
    self.assertAllEqual(values, self.reference)
    self.assertGreater(values.min(), 0.0)

  def test_order_keys_files_and_shards_do_not_matter(self):
    rng = np.random.default_rng(1)
    # Sparse keys, negative and beyond 32 bits, rows shuffled over 5 files.
    keys = rng.choice(2**40, size=self.n, replace=False) - 2**39
    order = rng.permutation(self.n)
    files = records.write_examples(
        os.path.join(self.root, "shuffled", "ex"), self.x[order], self.specs,
        keys=keys[order], num_shards=5)
    expected = targets.mc_dropout_targets(
        self.model, self.x, num_samples=_NUM_SAMPLES, seed=_SEED,
        batch_size=_BATCH, keys=keys)
    output = self.new_dir()
    summary = self.run_pipeline(
        output, inputs=files, num_shards=7, beam_batch_size=3 * _BATCH,
        output_format=records.PARQUET, pipeline_args=[
            "--direct_num_workers=2",
            "--direct_running_mode=multi_threading"])
    # Bundles of two threads over 5 files: still only the last item pads.
    self.assertEqual(summary["examples_padded"], 48)
    got_keys, got = records.read_targets(output)
    by_key = np.argsort(keys)
    self.assertAllEqual(got_keys, keys[by_key])
    self.assertAllEqual(got, expected[by_key])
    # Asking in the original row order gives the in-process array back.
    self.assertAllEqual(records.read_targets(output, keys=keys)[1], expected)

  def test_multi_processing_direct_runner(self):
    output = self.new_dir()
    self.run_pipeline(output, pipeline_args=[
        "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    self.assertAllEqual(records.read_targets(output)[1], self.reference)

  def test_portable_runner_workers_in_other_processes_same_bytes(self):
    direct = self.new_dir()
    self.run_pipeline(direct)
    portable = self.new_dir()
    with beam_testing.portable_runner_args() as flags:
      summary = self.run_pipeline(portable, pipeline_args=flags)
    self.assertEqual(summary["examples_computed"], self.n)
    self.assertEqual(beam_testing.file_bytes(portable),
                     beam_testing.file_bytes(direct))
    self.assertAllEqual(records.read_targets(portable)[1], self.reference)

  def test_npz_input_dict_model_and_class_statistics(self):
    model = beam_testing.build_model("dict", seed=3)
    path = os.path.join(self.root, "dict.keras")
    model.save(path)
    x = beam_testing.dict_inputs(700, seed=2)
    npz = os.path.join(self.root, "dict.npz")
    np.savez(npz, **x)  # No key array: keys are row indices.
    for statistic, shape in [("predicted_class_std", (700,)),
                             ("per_class_std", (700, 3))]:
      output = self.new_dir()
      targets_pipeline.run_targets_pipeline(
          path, npz, output, num_samples=_NUM_SAMPLES, seed=_SEED,
          batch_size=_BATCH, statistic=statistic, num_shards=3)
      keys, got = records.read_targets(output)
      expected = targets.mc_dropout_targets(
          model, x, num_samples=_NUM_SAMPLES, seed=_SEED, batch_size=_BATCH,
          statistic=statistic)
      self.assertEqual(got.shape, shape)
      self.assertAllEqual(keys, np.arange(700))
      self.assertAllEqual(got, expected, msg=statistic)

  def test_two_output_model_equals_mc_dropout_targets_exactly(self):
    model = beam_testing.build_model("two_outputs", seed=4)
    path = os.path.join(self.root, "two_outputs.keras")
    model.save(path)
    names = ["value", "klass"]  # The Keras output order, not sorted.
    for fmt, statistic, klass_shape in [
        (records.TFRECORD, "auto", (self.n,)),
        (records.PARQUET, {"klass": "per_class_std", "value": "std"},
         (self.n, 3))]:
      output = self.new_dir()
      summary = targets_pipeline.run_targets_pipeline(
          path, self.files, output, num_samples=_NUM_SAMPLES, seed=_SEED,
          batch_size=_BATCH, num_shards=3, output_format=fmt,
          statistic=statistic)
      expected = targets.mc_dropout_targets(
          model, self.x, num_samples=_NUM_SAMPLES, seed=_SEED,
          batch_size=_BATCH, statistic=statistic)
      manifest = summary["manifest"]
      self.assertEqual(manifest["output_names"], names)
      self.assertEqual(manifest["statistic"]["value"], "std")
      self.assertEqual(manifest["target_shape"]["value"], [])
      self.assertEqual(manifest["target_shape"]["klass"],
                       list(klass_shape[1:]))
      keys, got = records.read_targets(output)
      self.assertAllEqual(keys, np.arange(self.n))
      self.assertEqual(list(got), list(expected))
      self.assertEqual(list(got), names)
      self.assertEqual(got["klass"].shape, klass_shape)
      for name in names:
        self.assertEqual(got[name].dtype, np.float32)
        self.assertGreater(got[name].max(), 0.0)
        self.assertAllEqual(got[name], expected[name], msg=(fmt, name))
      # Asked by key, in another order: the same rows of every output.
      wanted = np.arange(self.n)[::-1][:100]
      _, some = records.read_targets(output, keys=wanted)
      for name in names:
        self.assertAllEqual(some[name], expected[name][wanted])

  def test_two_output_model_resumes_and_writes_the_same_bytes(self):
    model = beam_testing.build_model("two_outputs", seed=4)
    path = os.path.join(self.root, "two_outputs_resume.keras")
    model.save(path)
    expected = targets.mc_dropout_targets(
        model, self.x, num_samples=_NUM_SAMPLES, seed=_SEED,
        batch_size=_BATCH)
    run = dict(num_samples=_NUM_SAMPLES, seed=_SEED, batch_size=_BATCH,
               num_shards=3)
    output = self.new_dir()
    with beam_testing.killed_on_call(targets_transforms.TargetsFn, 3):
      with self.assertRaisesRegex(Exception, "simulated kill"):
        targets_pipeline.run_targets_pipeline(path, self.files, output,
                                              **run)
    self.assertLen(parts.existing_parts(output), 2)
    summary = targets_pipeline.run_targets_pipeline(path, self.files, output,
                                                    **run)
    self.assertEqual(summary["examples_skipped"], 2 * 8 * _BATCH)
    self.assertEqual(summary["examples_computed"], self.n - 2 * 8 * _BATCH)
    _, got = records.read_targets(output)
    for name in expected:
      self.assertAllEqual(got[name], expected[name], msg=name)
    # Worker processes write the bytes of the resumed in-process run.
    processes = self.new_dir()
    targets_pipeline.run_targets_pipeline(
        path, self.files, processes, pipeline_args=[
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
        **run)
    self.assertEqual(beam_testing.file_bytes(processes),
                     beam_testing.file_bytes(output))

  def test_rerun_after_failed_batch_loses_and_duplicates_nothing(self):
    output = self.new_dir()
    marker = os.path.join(self.new_dir(), "failed_once")
    original = targets_transforms.TargetsFn.process

    def fail_once(fn_self, item):
      elements = list(item[1])
      if 1234 in [key for key, _ in elements] and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("simulated worker failure")
      yield from original(fn_self, (item[0], elements))

    with mock.patch.object(targets_transforms.TargetsFn, "process", fail_once):
      try:
        self.run_pipeline(output)
        failed = False
      except Exception as e:
        # The runner reports the worker's error wrapped in its own type.
        self.assertIn("simulated worker failure", str(e))
        failed = True
      self.assertTrue(os.path.exists(marker))
      if failed:
        with self.assertRaisesRegex(ValueError, "did not finish"):
          records.read_targets(output)
      self.run_pipeline(output)
    keys, values = records.read_targets(output)
    self.assertAllEqual(keys, np.arange(self.n))
    self.assertAllEqual(values, self.reference)

  def test_rerun_after_a_kill_computes_only_what_is_missing(self):
    output = self.new_dir()
    original = targets_transforms.TargetsFn.process
    calls = []

    def die_on_third_batch(fn_self, item):
      elements = list(item[1])
      calls.append(len(elements))
      if len(calls) == 3:
        raise RuntimeError("simulated kill")
      yield from original(fn_self, (item[0], elements))

    with mock.patch.object(targets_transforms.TargetsFn, "process",
                           die_on_third_batch):
      with self.assertRaisesRegex(Exception, "simulated kill"):
        self.run_pipeline(output)
    with self.assertRaisesRegex(ValueError, "did not finish"):
      records.read_targets(output)
    saved = parts.existing_parts(output)
    self.assertLen(saved, 2)  # Saved as they were computed.
    self.assertEmpty([n for n in os.listdir(os.path.join(output, "parts"))
                      if n.startswith(".")])  # No temporary file left.
    done = sum(calls[:2])
    summary = self.run_pipeline(output)
    self.assertEqual(summary["examples_skipped"], done)
    self.assertEqual(summary["examples_computed"], self.n - done)
    keys, values = records.read_targets(output)
    self.assertAllEqual(keys, np.arange(self.n))
    self.assertAllEqual(values, self.reference)
    # A rerun of a finished run computes nothing and changes no byte.
    before = beam_testing.file_bytes(output)
    summary = self.run_pipeline(output)
    self.assertEqual(summary["examples_computed"], 0)
    self.assertEqual(summary["examples_skipped"], self.n)
    self.assertEqual(beam_testing.file_bytes(output), before)

  def test_duplicated_input_is_merged_conflicting_keys_fail(self):
    output = self.new_dir()
    # The same 100 examples delivered twice (e.g. a file listed twice).
    again = records.write_examples(os.path.join(self.root, "again", "ex"),
                                   self.x[:100], self.specs)
    summary = self.run_pipeline(output, inputs=self.files + again)
    self.assertEqual(summary["duplicates_dropped"], 100)
    self.assertEqual(summary["manifest"]["num_input_records"], self.n + 100)
    self.assertAllEqual(records.read_targets(output)[1], self.reference)
    # Different examples under existing keys: refused.
    other = records.write_examples(os.path.join(self.root, "other", "ex"),
                                   self.x[100:200], self.specs)
    with self.assertRaisesRegex(Exception, "share a key"):
      self.run_pipeline(self.new_dir(),
                        inputs=self.files + other)

  def test_other_settings_refused_unless_not_resuming(self):
    output = self.new_dir()
    self.run_pipeline(output, num_samples=4)
    with self.assertRaises(ValueError) as ctx:
      self.run_pipeline(output, num_samples=4, seed=8)
    self.assertStartsWith(str(ctx.exception), _ERR_OTHER_SETTINGS)
    summary = self.run_pipeline(output, num_samples=4, seed=8, resume=False)
    self.assertEqual(summary["examples_computed"], self.n)
    expected = targets.mc_dropout_targets(self.model, self.x, num_samples=4,
                                          seed=8, batch_size=_BATCH)
    self.assertAllEqual(records.read_targets(output)[1], expected)

  def cli_args(self, output, num_shards=3):
    return ["--model", self.model_path, "--input",
            os.path.join(self.root, "ex", "ex-*"), "--output", output,
            "--num_samples", str(_NUM_SAMPLES), "--seed", str(_SEED),
            "--batch_size", str(_BATCH), "--num_shards", str(num_shards)]

  def test_same_bytes_in_every_process_and_hash_seed(self):
    outputs = []
    for hash_seed in ("1", "2"):
      output = self.new_dir()
      env = dict(os.environ, PYTHONHASHSEED=hash_seed)
      subprocess.run([sys.executable, "-m",
                      "dropvar_tf.beam.targets_pipeline"] +
                     self.cli_args(output), check=True, env=env,
                     capture_output=True)
      outputs.append(output)
    outputs.append(self.new_dir())
    self.run_pipeline(outputs[-1], num_shards=3)
    contents = [beam_testing.file_bytes(output) for output in outputs]
    self.assertLen(contents[0], 5)  # 3 shards, settings and manifest.
    self.assertEqual(contents[0], contents[1])
    self.assertEqual(contents[0], contents[2])

  def test_failed_relaunch_keeps_a_finished_output_readable(self):
    output = self.new_dir()
    self.run_pipeline(output)
    before = beam_testing.file_bytes(output)

    def fail(fn_self, item):
      raise RuntimeError("simulated worker failure")

    # A resumed finished run computes nothing; it dies rewriting shards.
    with mock.patch.object(targets_transforms.WriteShardFn, "process", fail):
      with self.assertRaisesRegex(Exception, "simulated worker failure"):
        self.run_pipeline(output)
    with self.assertRaises(FileNotFoundError):
      self.run_pipeline(output, inputs=os.path.join(self.root, "none-*"),
                        resume=False)
    with self.assertRaises(ValueError):
      self.run_pipeline(output, seed=_SEED + 1)
    self.assertEqual(beam_testing.file_bytes(output), before)
    self.assertAllEqual(records.read_targets(output)[1], self.reference)

  def test_invalid_arguments(self):
    output = self.new_dir()
    cases = [
        (dict(num_samples=1), "`num_samples`. Expected an integer >= 2"),
        (dict(beam_batch_size=100), "`beam_batch_size`. Expected a multiple "
         "of batch_size (64)"),
        (dict(output_format="csv"), "`output_format`. Expected one of"),
        (dict(statistic="var"), "`statistic`. Expected one of"),
    ]
    for kwargs, message in cases:
      with self.assertRaisesRegex(ValueError, message.replace(
          "(", r"\(").replace(")", r"\)")):
        self.run_pipeline(output, **kwargs)
    with self.assertRaises(FileNotFoundError):
      self.run_pipeline(output, inputs=os.path.join(self.root, "none-*"))

  def test_cli_refuses_a_mistyped_flag_before_any_work(self):
    output = os.path.join(self.new_dir(), "out")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      with self.assertRaises(SystemExit) as ctx:
        targets_pipeline.main(self.cli_args(output) + ["--num-samples", "4"])
    self.assertEqual(ctx.exception.code, 2)
    self.assertIn("did you mean --num_samples?", stderr.getvalue())
    self.assertFalse(os.path.exists(output))

  def test_cli_refuses_out_of_range_values_before_any_work(self):
    output = os.path.join(self.new_dir(), "out")
    for extra, message in [
        (["--num_samples", "0"], "argument --num_samples: expected an "
         "integer >= 2, got 0"),
        (["--output_format", "csv"], "argument --output_format: expected "
         "one of tfrecord, parquet, got 'csv'")]:
      with self.subTest(extra=extra):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
          with self.assertRaises(SystemExit) as ctx:
            targets_pipeline.main(self.cli_args(output) + extra)
        self.assertEqual(ctx.exception.code, 2)
        self.assertTrue(stderr.getvalue().endswith(f"error: {message}\n"),
                        stderr.getvalue())
    self.assertFalse(os.path.exists(output))

  def test_cli_answers_a_bad_file_in_one_line(self):
    keys = os.path.join(self.root, "float_keys.npz")
    np.savez(keys, key=np.arange(5) + 0.5, features=self.x[:5])
    for args, message in [
        (["--model", os.path.join(self.root, "missing.keras")], "missing"),
        (["--input", keys], "Expected an integer 'key' array (keys are "
         "int64)")]:
      with self.subTest(args=args):
        cli = self.cli_args(os.path.join(self.new_dir(), "out"))
        for flag, value in zip(args[::2], args[1::2]):
          cli[cli.index(flag) + 1] = value
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
          self.assertEqual(targets_pipeline.main(cli), 1)
        self.assertIn(message, stderr.getvalue())
        self.assertLen(stderr.getvalue().strip().splitlines(), 1)

  def test_cli(self):
    output = self.new_dir()
    code = targets_pipeline.main([
        "--model", self.model_path, "--input",
        os.path.join(self.root, "ex", "ex-*"), "--output", output,
        "--num_samples", str(_NUM_SAMPLES), "--seed", str(_SEED),
        "--batch_size", str(_BATCH), "--num_shards", "2",
        "--output_format", "parquet", "--runner", "DirectRunner"])
    self.assertEqual(code, 0)
    self.assertAllEqual(records.read_targets(output)[1], self.reference)


if __name__ == "__main__":
  tf.test.main()
