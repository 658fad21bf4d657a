"""Tests for dropvar_tf.beam.targets_pipeline and dropvar_tf.beam.records.

The pipeline tests need `apache_beam` (run them in a venv with
`dropvar_tf[beam]`, e.g. `.venv-beam/bin/python -m pytest -q
tests/beam_targets_test.py`); they are skipped, with the reason, elsewhere.
The reader and format tests need only dropvar_tf and always run.

Exactness: the pipeline pads every compute batch to `batch_size` rows, as
`mc_dropout_targets` pads its own last batch, and passes each example's key,
so each example meets the same masks in compiled calls of the same shapes:
the targets are compared for bitwise equality, not to a tolerance.
"""

import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import numpy as np

from dropvar_tf import targets
from dropvar_tf._keras import keras
from dropvar_tf._keras import tf
from dropvar_tf.beam import records

try:
  import apache_beam  # pylint: disable=unused-import
  from dropvar_tf.beam import targets_pipeline
except ImportError:
  targets_pipeline = None

_SKIP_REASON = ("apache_beam is not installed: install dropvar_tf[beam] "
                "(e.g. in .venv-beam) to run the Beam pipeline tests")

_NUM_SAMPLES = 8
_SEED = 7
_BATCH = 64
_ERR_OTHER_SETTINGS = (
    "Invalid value received for argument `output`. Expected a directory "
    "written with the same settings, or resume=False; its `seed` is 7, this "
    "run's is 8")


def build_model(kind="regression", seed=0):
  """Tiny seeded models: MLP with two Dropouts; or a dict-input softmax."""
  keras.utils.set_random_seed(seed)
  if kind == "regression":
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(32, activation="relu")(x)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    h = keras.layers.Dropout(0.2)(h)
    return keras.Model(x, keras.layers.Dense(1)(h))
  user = keras.Input((), dtype="int64", name="user_id")
  dense = keras.Input((3,), name="dense")
  e = keras.layers.Flatten()(keras.layers.Embedding(20, 4)(user))
  h = keras.layers.Concatenate()([e, dense])
  h = keras.layers.Dense(16, activation="relu")(h)
  h = keras.layers.Dropout(0.4)(h)
  out = keras.layers.Dense(3, activation="softmax")(h)
  return keras.Model({"user_id": user, "dense": dense}, out)


def regression_inputs(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def dict_inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"user_id": rng.integers(0, 20, size=n).astype(np.int64),
          "dense": rng.normal(size=(n, 3)).astype(np.float32)}


def write_targets_dir(path, keys, values, num_shards=3,
                      fmt=records.TFRECORD, shard_rows=None):
  """Lays out a targets directory as the pipeline does (no Beam needed).

  `shard_rows` optionally maps a shard index to the rows it holds, to build
  corrupted layouts.
  """
  os.makedirs(path, exist_ok=True)
  keys = np.asarray(keys, np.int64)
  values = np.asarray(values, np.float32)
  shard = records.shard_of(keys, num_shards)
  entries = []
  for i in range(num_shards):
    rows = (shard_rows or {}).get(i, np.flatnonzero(shard == i))
    rows = np.asarray(rows, np.int64)
    rows = rows[np.argsort(keys[rows], kind="stable")]
    data = records.encode_shard(keys[rows], values[rows], fmt)
    name = records.shard_filename(i, num_shards, fmt)
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
    entries.append({"index": i, "file": name, "count": len(rows),
                    "sha256": records.sha256(data)})
  manifest = {"output_format": fmt, "num_shards": num_shards,
              "target_shape": list(values.shape[1:]), "shards": entries,
              "num_keys": sum(e["count"] for e in entries)}
  with open(os.path.join(path, records.MANIFEST_FILENAME), "w") as f:
    json.dump(manifest, f)
  return manifest


class RecordsTest(tf.test.TestCase):
  """Formats and the reader's checks: no Beam needed."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.keys = rng.permutation(np.arange(-50, 250, 3, dtype=np.int64))
    self.values = rng.uniform(size=self.keys.shape).astype(np.float32)

  def test_shard_of_is_deterministic_and_balanced(self):
    keys = np.arange(0, 64000, 8, dtype=np.int64)  # a common stride
    shards = records.shard_of(keys, 8)
    self.assertAllEqual(shards, records.shard_of(keys[::-1], 8)[::-1])
    counts = np.bincount(shards, minlength=8)
    self.assertEqual(counts.sum(), keys.size)
    self.assertLess(counts.max() / counts.min(), 1.1)
    self.assertAllInRange(records.shard_of([-2**63, 2**63 - 1, 0], 5), 0, 4)

  def test_read_targets_round_trip_ordered_by_key(self):
    for fmt in records.TARGET_FORMATS:
      path = os.path.join(self.get_temp_dir(), f"ok_{fmt}")
      write_targets_dir(path, self.keys, self.values, fmt=fmt)
      keys, values = records.read_targets(path)
      order = np.argsort(self.keys)
      self.assertAllEqual(keys, self.keys[order])
      self.assertAllEqual(values, self.values[order])
      wanted = self.keys[[5, 0, 7]]
      got_keys, got = records.read_targets(path, keys=wanted)
      self.assertAllEqual(got_keys, wanted)
      self.assertAllEqual(got, self.values[[5, 0, 7]])

  def test_vector_targets_in_both_formats(self):
    values = np.arange(self.keys.size * 3, dtype=np.float32).reshape(-1, 3)
    for fmt in records.TARGET_FORMATS:
      path = os.path.join(self.get_temp_dir(), f"vec_{fmt}")
      write_targets_dir(path, self.keys, values, fmt=fmt)
      keys, got = records.read_targets(path)
      self.assertAllEqual(got, values[np.argsort(self.keys)])
      self.assertEqual(keys.shape, (self.keys.size,))

  def test_no_manifest_means_unfinished(self):
    path = os.path.join(self.get_temp_dir(), "unfinished")
    write_targets_dir(path, self.keys, self.values)
    os.remove(os.path.join(path, records.MANIFEST_FILENAME))
    with self.assertRaisesRegex(ValueError, "did not finish"):
      records.read_targets(path)

  def test_missing_shard_file(self):
    path = os.path.join(self.get_temp_dir(), "missing_shard")
    manifest = write_targets_dir(path, self.keys, self.values)
    os.remove(os.path.join(path, manifest["shards"][1]["file"]))
    with self.assertRaisesRegex(ValueError, "is missing"):
      records.read_targets(path)

  def test_altered_shard_file(self):
    path = os.path.join(self.get_temp_dir(), "altered")
    manifest = write_targets_dir(path, self.keys, self.values)
    shard = os.path.join(path, manifest["shards"][0]["file"])
    with open(shard, "rb") as f:
      data = f.read()
    with open(shard, "wb") as f:
      f.write(data[:len(data) // 2])  # A torn write.
    with self.assertRaisesRegex(ValueError, "does not match its manifest"):
      records.read_targets(path)

  def test_duplicate_key_in_a_shard(self):
    path = os.path.join(self.get_temp_dir(), "duplicate")
    shard0 = np.flatnonzero(records.shard_of(self.keys, 3) == 0)
    write_targets_dir(path, self.keys, self.values,
                      shard_rows={0: np.concatenate([shard0, shard0[:1]])})
    with self.assertRaisesRegex(
        ValueError, rf"Duplicate example keys .*\[{self.keys[shard0[0]]}\]"):
      records.read_targets(path)

  def test_key_in_the_wrong_shard(self):
    path = os.path.join(self.get_temp_dir(), "stray")
    shard = records.shard_of(self.keys, 3)
    stray = np.flatnonzero(shard == 2)[:1]
    write_targets_dir(path, self.keys, self.values, shard_rows={
        0: np.concatenate([np.flatnonzero(shard == 0), stray])})
    with self.assertRaisesRegex(ValueError, "holds keys of other shards"):
      records.read_targets(path)

  def test_missing_keys(self):
    path = os.path.join(self.get_temp_dir(), "lost")
    write_targets_dir(path, self.keys, self.values)
    manifest_path = os.path.join(path, records.MANIFEST_FILENAME)
    with open(manifest_path) as f:
      manifest = json.load(f)
    manifest["num_keys"] += 1
    with open(manifest_path, "w") as f:
      json.dump(manifest, f)
    with self.assertRaisesRegex(ValueError, "keys are missing"):
      records.read_targets(path)
    manifest["num_keys"] -= 1
    with open(manifest_path, "w") as f:
      json.dump(manifest, f)
    with self.assertRaisesRegex(ValueError, r"1 requested keys are missing"):
      records.read_targets(path, keys=[self.keys[0], 10**12])

  def test_merge_duplicates(self):
    keys = np.array([5, 3, 5, 9, 3], np.int64)
    values = np.array([1.0, 2.0, 1.0 + 1e-7, 4.0, 2.0], np.float32)
    got_keys, got, dropped = records.merge_duplicates(keys, values)
    self.assertAllEqual(got_keys, [3, 5, 9])
    self.assertAllEqual(got, [2.0, 1.0, 4.0])
    self.assertEqual(dropped, 2)
    # Arrival order does not change the pick.
    again = records.merge_duplicates(keys[::-1], values[::-1])
    self.assertAllEqual(again[1], got)
    with self.assertRaisesRegex(ValueError, r"keys \[5\] occur with "
                                "different targets"):
      records.merge_duplicates(keys, np.array([1, 2, 3, 4, 2], np.float32))

  def test_write_and_parse_examples_dict_inputs(self):
    model = build_model("dict")
    specs = records.model_input_specs(model)
    self.assertEqual(specs["kind"], "dict")
    self.assertCountEqual([n for n, _, _ in specs["inputs"]],
                          ["user_id", "dense"])
    x = dict_inputs(10)
    keys = np.arange(100, 110, dtype=np.int64)
    (path,) = records.write_examples(
        os.path.join(self.get_temp_dir(), "ex"), x, specs, keys=keys)
    serialized = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    got_keys, got = records.parse_examples(serialized, specs)
    self.assertAllEqual(got_keys, keys)
    self.assertAllEqual(got["user_id"], x["user_id"])
    self.assertAllEqual(got["dense"], x["dense"])
    self.assertEqual(got["user_id"].dtype, np.int64)
    with self.assertRaisesRegex(ValueError, "Cannot parse input examples"):
      records.parse_examples(serialized, specs, key_feature="id")
    with self.assertRaisesRegex(ValueError, "unique example keys"):
      records.write_examples(os.path.join(self.get_temp_dir(), "dup"), x,
                             specs, keys=np.zeros(10, np.int64))

  def test_single_input_feature_rename(self):
    model = build_model()
    self.assertEqual(records.model_input_specs(model)["inputs"],
                     [["features", "float32", [6]]])
    self.assertEqual(records.model_input_specs(model, "x")["inputs"],
                     [["x", "float32", [6]]])
    with self.assertRaisesRegex(ValueError, "`input_feature`"):
      records.model_input_specs(build_model("dict"), "x")


@unittest.skipIf(targets_pipeline is None, _SKIP_REASON)
class TargetsPipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="beam_targets_test_")
    cls.model = build_model()
    cls.model_path = os.path.join(cls.root, "model.keras")
    cls.model.save(cls.model_path)
    cls.n = 2000
    cls.x = regression_inputs(cls.n)
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
    summary = self.run_pipeline(output)
    self.assertEqual(summary["examples_computed"], self.n)
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
    self.run_pipeline(output, inputs=files, num_shards=7,
                      beam_batch_size=3 * _BATCH,
                      output_format=records.PARQUET)
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

  def test_npz_input_dict_model_and_class_statistics(self):
    model = build_model("dict", seed=3)
    path = os.path.join(self.root, "dict.keras")
    model.save(path)
    x = dict_inputs(700, seed=2)
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

  def test_rerun_after_failed_batch_loses_and_duplicates_nothing(self):
    output = self.new_dir()
    marker = os.path.join(self.new_dir(), "failed_once")
    original = targets_pipeline.TargetsFn.process

    def fail_once(fn_self, batch):
      keys, _ = records.parse_examples(list(batch), self.specs)
      if 1234 in keys and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("simulated worker failure")
      yield from original(fn_self, batch)

    with mock.patch.object(targets_pipeline.TargetsFn, "process", fail_once):
      try:
        self.run_pipeline(output)
        failed = False
      except Exception as e:  # pylint: disable=broad-except
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

  def test_rerun_after_dying_write_reuses_finished_shards(self):
    output = self.new_dir()
    original = targets_pipeline.atomic_write
    dead = []

    def die_on_shard_2(path, data):
      if "targets-00002-" in path and not dead:
        # A process killed mid-write leaves a partial temporary file.
        with open(path + ".tmp-killed", "wb") as f:
          f.write(data[:len(data) // 3])
        dead.append(path)
        raise RuntimeError("simulated write failure")
      original(path, data)

    with mock.patch.object(targets_pipeline, "atomic_write", die_on_shard_2):
      with self.assertRaisesRegex(Exception, "simulated write failure"):
        self.run_pipeline(output)
    self.assertFalse(os.path.exists(dead[0]))
    with self.assertRaisesRegex(ValueError, "did not finish"):
      records.read_targets(output)
    written = targets_pipeline.existing_shards(output, 4, records.TFRECORD)
    self.assertNotIn(2, written)
    before = {i: open(os.path.join(output, records.shard_filename(
        i, 4, records.TFRECORD)), "rb").read() for i in written}
    summary = self.run_pipeline(output)
    shard = records.shard_of(np.arange(self.n), 4)
    skipped = int(np.isin(shard, written).sum())
    self.assertEqual(summary["examples_skipped"], skipped)
    self.assertEqual(summary["examples_computed"], self.n - skipped)
    for i, data in before.items():  # Finished shards were left as they were.
      with open(os.path.join(output, records.shard_filename(
          i, 4, records.TFRECORD)), "rb") as f:
        self.assertEqual(f.read(), data)
    keys, values = records.read_targets(output)
    self.assertAllEqual(keys, np.arange(self.n))
    self.assertAllEqual(values, self.reference)

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
