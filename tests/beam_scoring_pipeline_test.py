"""Tests for dropvar_tf.beam.scoring_pipeline.

They need `apache_beam` (run them in a venv with `dropvar_tf[beam]`, e.g.
`.venv-beam/bin/python -m pytest -q tests/beam_scoring_pipeline_test.py`)
and are skipped, with the reason, elsewhere.

Beam scores are compared with the same `serving_default` signature called
in-process on batches of the pipeline's `batch_size` (the last one padded, as
the pipeline pads its batches): every call then has the same shape, and the
scores are compared for bitwise equality. Against one call on all examples
(another shape, whose kernels may round differently) they agree to float32
tolerance.
"""

import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf.beam import records
import beam_testing
import testing_models

if beam_testing.HAVE_BEAM:
  from dropvar_tf.beam import model_handler
  from dropvar_tf.beam import parts
  from dropvar_tf.beam import scoring_pipeline
  from dropvar_tf.beam import scoring_transforms


def build_dict_model(seed=0):
  """A tiny base model with named int64 and float inputs, 3-class softmax."""
  keras.utils.set_random_seed(seed)
  user = keras.Input((), dtype="int64", name="user_id")
  dense = keras.Input((3,), name="dense")
  e = keras.layers.Flatten()(keras.layers.Embedding(20, 4)(user))
  h = keras.layers.Concatenate()([e, dense])
  h = keras.layers.Dense(16, activation="relu")(h)
  h = keras.layers.Dropout(0.3)(h)
  out = keras.layers.Dense(3, activation="softmax")(h)
  return keras.Model({"user_id": user, "dense": dense}, out)


def build_regression_model(seed=0):
  keras.utils.set_random_seed(seed)
  x = keras.Input((5,), name="x")
  h = keras.layers.Dense(16, activation="relu")(x)
  h = keras.layers.Dropout(0.2)(h)
  return keras.Model(x, keras.layers.Dense(1)(h))




def read_scoring_json(output):
  with open(os.path.join(output, records.SCORING_FILENAME)) as f:
    return json.load(f)


def signature_in_batches(fn, x, batch_size, input_name="x"):
  """{output: array} of `fn` called on padded batches of `batch_size` rows.

  Each output is stored as the pipeline stores it: (n,) when it has one
  value per example, else (n, ...).
  """
  parts = []
  for start in range(0, len(x), batch_size):
    rows = np.arange(start, start + batch_size).clip(max=len(x) - 1)
    out = fn(**{input_name: tf.constant(x[rows])})
    n = min(batch_size, len(x) - start)
    parts.append({k: v.numpy()[:n] for k, v in out.items()})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return {k: v.reshape(-1) if v[0].size == 1 else v for k, v in out.items()}


@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class ScoringPipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="beam_scoring_test_")
    cls.dual = heads.add_variation_head(build_regression_model())
    cls.export = saved_model.export_saved_model(
        cls.dual, os.path.join(cls.root, "regression"), version=1)
    cls.loaded, cls.fn = model_handler.load_signature(cls.export)
    cls.specs = records.signature_input_specs(cls.fn)
    cls.n = 1500
    cls.x = np.random.default_rng(0).normal(size=(cls.n, 5)).astype(
        np.float32)
    cls.files = records.write_examples(os.path.join(cls.root, "ex", "ex"),
                                       cls.x, cls.specs, num_shards=3)
    cls.expected = {k: v.numpy() for k, v in cls.fn(x=tf.constant(
        cls.x)).items()}
    # Calibrated on a narrower part of the inputs: many rows lie outside.
    cls.far_export = saved_model.export_saved_model(
        testing_models.fitted_dual(build_regression_model(),
                                 0.5 * cls.x[:300]),
        os.path.join(cls.root, "out_of_range"), version=1)
    cls.far_loaded, cls.far_fn = model_handler.load_signature(
        cls.far_export)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def test_scores_match_the_signature_in_every_format(self):
    self.assertEqual(self.specs, {"kind": "dict",
                                  "inputs": [["x", "float32", [5]]]})
    for fmt in records.SCORE_FORMATS:
      output = self.new_dir()
      summary = scoring_pipeline.run_scoring_pipeline(
          self.export, os.path.join(self.root, "ex", "ex-*"), output,
          output_format=fmt, batch_size=100, num_shards=2)
      self.assertEqual(summary["examples_scored"], self.n)
      self.assertLen(tf.io.gfile.glob(os.path.join(output, f"scores-*.{fmt}")),
                     2)
      got = records.read_scores(output)
      self.assertAllEqual(got["key"], np.arange(self.n))
      for name in contract.OUTPUT_KEYS:
        self.assertEqual(got[name].shape, (self.n,), msg=(fmt, name))
        self.assertAllClose(got[name], np.reshape(self.expected[name], [-1]),
                            rtol=1e-5,
                            atol=1e-6, msg=(fmt, name))
      self.assertGreaterEqual(got[contract.VARIATION_KEY].min(), 0.0)
      self.assertGreater(got[contract.VARIATION_KEY].std(), 0.0)

  def test_runs_are_bitwise_equal_to_in_process_batches(self):
    expected = signature_in_batches(self.fn, self.x, 64)
    runs, outputs = [], []
    with beam_testing.portable_runner_args() as portable:
      for flags in ([], ["--direct_num_workers=2",
                         "--direct_running_mode=multi_threading"], portable):
        outputs.append(self.new_dir())
        summary = scoring_pipeline.run_scoring_pipeline(
            self.export, self.files, outputs[-1], batch_size=64,
            pipeline_args=flags)
        runs.append(records.read_scores(outputs[-1]))
        # Items of 512 keys by rank, whatever the bundles: only the run's
        # last call (1500 = 23 * 64 + 28) pads.
        self.assertEqual(summary["examples_padded"], 36, msg=flags)
        self.assertEqual(summary["examples_scored"], self.n, msg=flags)
    # Same bytes on every runner, portable workers in other processes too.
    contents = [beam_testing.file_bytes(output) for output in outputs]
    # 8 score files, settings.json and scoring.json.
    self.assertLen(contents[0], 10)
    self.assertEqual(contents[1], contents[0])
    self.assertEqual(contents[2], contents[0])
    for got in runs:
      self.assertAllEqual(got["key"], np.arange(self.n))
      for name in contract.OUTPUT_KEYS:
        self.assertAllEqual(got[name], expected[name], msg=name)

  def test_rerun_after_a_kill_scores_only_what_is_missing(self):
    output = self.new_dir()
    expected = signature_in_batches(self.fn, self.x, 64)
    original = scoring_transforms.DecodeItemFn.process
    calls = []

    def die_on_third_item(fn_self, item):
      elements = list(item[1])
      calls.append(len(elements))
      if len(calls) == 3:
        raise RuntimeError("simulated kill")
      yield from original(fn_self, (item[0], elements))

    run = dict(batch_size=64, beam_batch_size=256, num_shards=3)
    with mock.patch.object(scoring_transforms.DecodeItemFn, "process",
                           die_on_third_item):
      with self.assertRaisesRegex(Exception, "simulated kill"):
        scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                              output, **run)
    with self.assertRaisesRegex(ValueError, "not a finished scoring"):
      records.read_scores(output)
    self.assertLen(parts.existing_parts(output), 2)  # Saved as scored.
    done = sum(calls[:2])
    summary = scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                                    output, **run)
    self.assertEqual(summary["examples_skipped"], done)
    self.assertEqual(summary["examples_scored"], self.n - done)
    got = records.read_scores(output)
    self.assertAllEqual(got["key"], np.arange(self.n))
    for name in contract.OUTPUT_KEYS:
      self.assertAllEqual(got[name], expected[name], msg=name)
    # A rerun of a finished run scores nothing and changes no byte.
    before = beam_testing.file_bytes(output)
    summary = scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                                    output, **run)
    self.assertEqual(summary["examples_scored"], 0)
    self.assertEqual(summary["examples_skipped"], self.n)
    self.assertEqual(beam_testing.file_bytes(output), before)
    # Other settings are refused, unless not resuming.
    with self.assertRaisesRegex(ValueError, "`output`. Expected a directory "
                                "scored with the same settings, or "
                                "resume=False; its `num_shards` is 3"):
      scoring_pipeline.run_scoring_pipeline(
          self.export, self.files, output, **dict(run, num_shards=2))
    self.assertEqual(beam_testing.file_bytes(output), before)
    summary = scoring_pipeline.run_scoring_pipeline(
        self.export, self.files, output, resume=False,
        **dict(run, num_shards=2))
    self.assertEqual(summary["examples_scored"], self.n)
    self.assertLen(tf.io.gfile.glob(os.path.join(output, "scores-*")), 2)
    self.assertAllEqual(records.read_scores(output)["variation"],
                        expected["variation"])

  def test_without_out_of_range_only_the_contract_outputs_are_written(self):
    output = self.new_dir()
    scoring_pipeline.run_scoring_pipeline(self.export, self.files, output,
                                          batch_size=64, num_shards=2)
    self.assertNotIn(contract.OUT_OF_RANGE_KEY, self.fn.structured_outputs)
    self.assertEqual(read_scoring_json(output)["output_shapes"],
                     {"prediction": [], "variation": []})
    self.assertEqual(sorted(records.read_scores(output)),
                     ["key", "prediction", "variation"])

  def test_fewer_examples_than_shards(self):
    # Most shards get no example: they are written empty, not refused.
    files = records.write_examples(
        os.path.join(self.new_dir(), "few"), self.x[:3], self.specs)
    output = self.new_dir()
    scoring_pipeline.run_scoring_pipeline(self.export, files, output,
                                          batch_size=64, num_shards=8)
    scores = records.read_scores(output)
    self.assertAllEqual(scores["key"], [0, 1, 2])
    self.assertAllEqual(scores["variation"], self.expected["variation"][:3])

  def test_out_of_range_in_every_format_bitwise_equal(self):
    names = contract.OUTPUT_KEYS + (contract.OUT_OF_RANGE_KEY,)
    self.assertEqual(sorted(self.far_fn.structured_outputs), sorted(names))
    expected = signature_in_batches(self.far_fn, self.x, 64)
    far = expected[contract.OUT_OF_RANGE_KEY]
    # Both kinds of rows, so that the comparison means something.
    self.assertGreater(np.mean(far > 0), 0.1)
    self.assertGreater(np.mean(far == 0), 0.02)
    outputs = {}
    for fmt in records.SCORE_FORMATS:
      outputs[fmt] = self.new_dir()
      summary = scoring_pipeline.run_scoring_pipeline(
          self.far_export, self.files, outputs[fmt], output_format=fmt,
          batch_size=64, num_shards=3)
      self.assertEqual(summary["examples_scored"], self.n)
      self.assertEqual(read_scoring_json(outputs[fmt])["output_shapes"],
                       {"out_of_range": [], "prediction": [],
                        "variation": []})
      got = records.read_scores(outputs[fmt])
      self.assertEqual(sorted(got), sorted(("key",) + names))
      self.assertAllEqual(got["key"], np.arange(self.n))
      for name in names:
        self.assertEqual(got[name].dtype, np.float32)
        self.assertAllEqual(got[name], expected[name], msg=(fmt, name))
    # Worker threads write the same bytes.
    threads = self.new_dir()
    scoring_pipeline.run_scoring_pipeline(
        self.far_export, self.files, threads, output_format=records.PARQUET,
        batch_size=64, num_shards=3, pipeline_args=[
            "--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    self.assertEqual(beam_testing.file_bytes(threads),
                     beam_testing.file_bytes(outputs[records.PARQUET]))

  def test_out_of_range_survives_a_rerun_after_a_kill(self):
    output = self.new_dir()
    expected = signature_in_batches(self.far_fn, self.x, 64)
    run = dict(batch_size=64, beam_batch_size=256, num_shards=3,
               output_format=records.TFRECORD)
    with beam_testing.killed_on_call(scoring_transforms.DecodeItemFn, 3):
      with self.assertRaisesRegex(Exception, "simulated kill"):
        scoring_pipeline.run_scoring_pipeline(self.far_export, self.files,
                                              output, **run)
    saved = parts.existing_parts(output)
    self.assertLen(saved, 2)
    with open(saved[0], "rb") as f:
      part_keys, part = parts.decode_part(
          f.read(), records.score_names(self.far_fn.structured_outputs))
    self.assertAllEqual(part[contract.OUT_OF_RANGE_KEY],
                        expected[contract.OUT_OF_RANGE_KEY][part_keys])
    summary = scoring_pipeline.run_scoring_pipeline(
        self.far_export, self.files, output, **run)
    self.assertEqual(summary["examples_skipped"], 512)
    got = records.read_scores(output)
    for name in contract.OUTPUT_KEYS + (contract.OUT_OF_RANGE_KEY,):
      self.assertAllEqual(got[name], expected[name], msg=name)

  def test_scores_match_the_keras_dual_model(self):
    output = self.new_dir()
    scoring_pipeline.run_scoring_pipeline(self.export, self.files, output)
    got = records.read_scores(output)
    direct = self.dual.predict(self.x, verbose=0)
    for name in contract.OUTPUT_KEYS:
      self.assertAllClose(got[name], np.reshape(direct[name], [-1]),
                          rtol=1e-5, atol=1e-6)

  def test_dict_inputs_npz_vector_prediction_and_runner_flags(self):
    dual = heads.add_variation_head(build_dict_model())
    export = saved_model.export_saved_model(
        dual, os.path.join(self.root, "dict"), version=3)
    x = beam_testing.dict_inputs(400, seed=1)
    keys = np.arange(400, dtype=np.int64) * 10 + 7
    npz = os.path.join(self.root, "dict.npz")
    np.savez(npz, key=keys, **x)
    output = self.new_dir()
    scoring_pipeline.main([
        "--saved_model", export, "--input", npz, "--output", output,
        "--output_format", "parquet", "--batch_size", "64",
        "--runner", "DirectRunner", "--direct_num_workers", "1"])
    got = records.read_scores(output)
    _, fn = model_handler.load_signature(export)
    expected = fn(**{k: tf.constant(v) for k, v in x.items()})
    self.assertAllEqual(got["key"], keys)
    self.assertEqual(got[contract.PREDICTION_KEY].shape, (400, 3))
    self.assertAllClose(got[contract.PREDICTION_KEY],
                        expected[contract.PREDICTION_KEY], rtol=1e-5,
                        atol=1e-6)
    self.assertAllClose(got[contract.VARIATION_KEY],
                        np.reshape(expected[contract.VARIATION_KEY], [-1]),
                        rtol=1e-5, atol=1e-6)

  def test_missing_input_feature_fails_with_the_expected_names(self):
    wrong = records.write_examples(
        os.path.join(self.root, "wrong", "ex"), self.x,
        {"kind": "dict", "inputs": [["features", "float32", [5]]]})
    with self.assertRaisesRegex(Exception, r"Cannot parse input examples "
                                r"with features \['key', 'x'\]"):
      scoring_pipeline.run_scoring_pipeline(self.export, wrong,
                                            self.new_dir())

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "`output_format`. Expected one "
                                "of"):
      scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                            self.new_dir(),
                                            output_format="csv")
    with self.assertRaisesRegex(ValueError, "`signature`. Expected one of "
                                "the SavedModel's signatures"):
      scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                            self.new_dir(), signature="nope")
    with self.assertRaisesRegex(ValueError, "not a finished scoring"):
      records.read_scores(self.new_dir())

  def test_signature_without_contract_outputs_is_refused(self):
    model = build_regression_model()
    plain = os.path.join(self.root, "plain")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        contract.SERVING_SIGNATURE, lambda x: {"y": model(x)},
        input_signature=[tf.TensorSpec((None, 5), tf.float32, name="x")])
    archive.write_out(plain, verbose=False)
    with self.assertRaisesRegex(ValueError, r"Expected a signature "
                                r"returning \['prediction', 'variation'\]"):
      scoring_pipeline.run_scoring_pipeline(plain, self.files, self.new_dir())



@unittest.skipIf(not beam_testing.HAVE_BEAM, beam_testing.SKIP_REASON)
class MultiOutputScoringTest(tf.test.TestCase):
  """Duals of a two-output model: "prediction/<name>", "variation/<name>".

  The base model (`beam_testing.build_model("two_outputs")`) has a list
  output: "value" (one unit) and "klass" (3-class softmax).
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="beam_scoring_multi_test_")
    cls.n = 700
    cls.x = beam_testing.regression_inputs(cls.n, seed=3)
    cls.export = saved_model.export_saved_model(
        heads.add_variation_head(beam_testing.build_model("two_outputs"),
                                 seed=0),
        os.path.join(cls.root, "two_outputs"), version=1)
    cls.loaded, cls.fn = model_handler.load_signature(cls.export)
    # Calibrated on a narrower part of the inputs: many rows lie outside.
    cls.far_export = saved_model.export_saved_model(
        testing_models.fitted_dual(beam_testing.build_model("two_outputs"),
                                 0.5 * cls.x[:200]),
        os.path.join(cls.root, "two_outputs_far"), version=1)
    cls.far_loaded, cls.far_fn = model_handler.load_signature(
        cls.far_export)
    cls.files = records.write_examples(
        os.path.join(cls.root, "ex", "ex"), cls.x,
        records.signature_input_specs(cls.fn), num_shards=3)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def new_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def test_every_output_in_every_format_bitwise_equal(self):
    names = ["klass", "value"]
    keys = contract.output_keys(names)
    shapes = {"prediction/klass": [3], "prediction/value": [],
              "variation/klass": [], "variation/value": []}
    for fn, export, far in ((self.fn, self.export, False),
                            (self.far_fn, self.far_export, True)):
      expected = signature_in_batches(fn, self.x, 64, "features")
      want = keys + ((contract.OUT_OF_RANGE_KEY,) if far else ())
      self.assertEqual(sorted(expected), sorted(want))
      if far:
        # Both kinds of rows, so that the comparison means something.
        self.assertGreater(np.mean(expected[contract.OUT_OF_RANGE_KEY] > 0),
                           0.1)
        self.assertGreater(
            np.mean(expected[contract.OUT_OF_RANGE_KEY] == 0), 0.02)
      outputs = {}
      for fmt in records.SCORE_FORMATS:
        outputs[fmt] = self.new_dir()
        summary = scoring_pipeline.run_scoring_pipeline(
            export, self.files, outputs[fmt], output_format=fmt,
            batch_size=64, num_shards=3)
        self.assertEqual(summary["examples_scored"], self.n)
        self.assertEqual(summary["examples_padded"], 4)  # 700 = 10 * 64 + 60
        info = read_scoring_json(outputs[fmt])
        self.assertEqual(info["output_names"], names)
        self.assertEqual(info["output_shapes"], dict(
            shapes, **({contract.OUT_OF_RANGE_KEY: []} if far else {})))
        got = records.read_scores(outputs[fmt])
        self.assertEqual(list(got), ["key"] + list(want))
        self.assertAllEqual(got["key"], np.arange(self.n))
        for name in want:
          self.assertEqual(got[name].dtype, np.float32)
          self.assertAllEqual(got[name], expected[name], msg=(fmt, name))
        self.assertEqual(got["prediction/klass"].shape, (self.n, 3))
        variation = contract.per_output(got, contract.VARIATION_KEY)
        self.assertEqual(sorted(variation), names)
        self.assertGreater(variation["value"].std(), 0.0)
      # Worker threads write the same bytes.
      threads = self.new_dir()
      scoring_pipeline.run_scoring_pipeline(
          export, self.files, threads, output_format=records.TFRECORD,
          batch_size=64, num_shards=3, pipeline_args=[
              "--direct_num_workers=2",
              "--direct_running_mode=multi_threading"])
      self.assertEqual(beam_testing.file_bytes(threads),
                       beam_testing.file_bytes(outputs[records.TFRECORD]))

  def test_rerun_after_a_kill_scores_only_what_is_missing(self):
    output = self.new_dir()
    expected = signature_in_batches(self.fn, self.x, 64, "features")
    names = records.score_names(self.fn.structured_outputs)
    self.assertEqual(names, contract.output_keys(["klass", "value"]))
    run = dict(batch_size=64, beam_batch_size=256, num_shards=2,
               output_format=records.PARQUET)
    with beam_testing.killed_on_call(scoring_transforms.DecodeItemFn, 3):
      with self.assertRaisesRegex(Exception, "simulated kill"):
        scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                              output, **run)
    with self.assertRaisesRegex(ValueError, "not a finished scoring"):
      records.read_scores(output)
    saved = parts.existing_parts(output)
    self.assertLen(saved, 2)
    for path in saved:
      with open(path, "rb") as f:
        part_keys, part = parts.decode_part(f.read(), names)
      for name in names:
        self.assertAllEqual(part[name], expected[name][part_keys], msg=name)
    summary = scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                                    output, **run)
    self.assertEqual(summary["examples_skipped"], 512)
    self.assertEqual(summary["examples_scored"], self.n - 512)
    got = records.read_scores(output)
    self.assertAllEqual(got["key"], np.arange(self.n))
    for name in names:
      self.assertAllEqual(got[name], expected[name], msg=name)
    # A rerun of a finished run scores nothing and changes no byte.
    before = beam_testing.file_bytes(output)
    summary = scoring_pipeline.run_scoring_pipeline(self.export, self.files,
                                                    output, **run)
    self.assertEqual(summary["examples_scored"], 0)
    self.assertEqual(summary["examples_skipped"], self.n)
    self.assertEqual(beam_testing.file_bytes(output), before)

  def test_incomplete_multi_output_signature_is_refused(self):
    model = beam_testing.build_model("two_outputs")
    plain = os.path.join(self.root, "incomplete")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        contract.SERVING_SIGNATURE,
        lambda features: {"prediction/value": model(features)[0],
                          "variation/value": model(features)[0][:, 0],
                          "prediction/klass": model(features)[1]},
        input_signature=[tf.TensorSpec((None, 6), tf.float32,
                                       name="features")])
    archive.write_out(plain, verbose=False)
    output = self.new_dir()
    with self.assertRaisesRegex(
        ValueError, r"`saved_model`. Expected a signature returning "
        r"\['prediction', 'variation'\], or 'prediction/<name>' and "
        r"'variation/<name>' for each of two or more outputs. Received: "
        r"saved_model=\"outputs \['prediction/klass', 'prediction/value', "
        r"'variation/value'\]\""):
      scoring_pipeline.run_scoring_pipeline(plain, self.files, output)
    self.assertEqual(os.listdir(output), [])

if __name__ == "__main__":
  tf.test.main()
