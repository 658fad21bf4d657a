"""Tests for dropvar_tf.beam.records: formats, sharding and the readers.

They need only dropvar_tf (no `apache_beam`) and always run.
"""

import json
import os

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.beam import records
import beam_testing


def write_targets_dir(path, keys, values, num_shards=3,
                      fmt=records.TFRECORD, shard_rows=None):
  """Lays out a targets directory as the pipeline does (no Beam needed).

  `values` is one array, or a dict {output name: array} (a model of
  several outputs, in output order). `shard_rows` optionally maps a shard
  index to the rows it holds, to build corrupted layouts.
  """
  os.makedirs(path, exist_ok=True)
  keys = np.asarray(keys, np.int64)
  if isinstance(values, dict):
    columns = {records.target_feature(name): np.asarray(v, np.float32)
               for name, v in values.items()}
  else:
    columns = {records.TARGET_FEATURE: np.asarray(values, np.float32)}
  shard = records.shard_of(keys, num_shards)
  entries = []
  for i in range(num_shards):
    rows = (shard_rows or {}).get(i, np.flatnonzero(shard == i))
    rows = np.asarray(rows, np.int64)
    rows = rows[np.argsort(keys[rows], kind="stable")]
    data = records.encode_shard(
        keys[rows], {name: v[rows] for name, v in columns.items()}, fmt)
    name = records.shard_filename(i, num_shards, fmt)
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
    entries.append({"index": i, "file": name, "count": len(rows),
                    "sha256": records.sha256(data)})
  manifest = {"output_format": fmt, "num_shards": num_shards,
              "shards": entries,
              "num_keys": sum(e["count"] for e in entries)}
  if isinstance(values, dict):
    manifest["output_names"] = list(values)
    manifest["target_shape"] = {name: list(np.shape(v)[1:])
                                for name, v in values.items()}
  else:
    manifest["target_shape"] = list(np.shape(values)[1:])
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

  def test_targets_of_several_outputs_read_back_as_a_dict(self):
    rng = np.random.default_rng(1)
    # Output order as the model has it (not sorted), as in the manifest.
    values = {"value": rng.uniform(size=self.keys.size).astype(np.float32),
              "klass": rng.uniform(size=(self.keys.size, 3)).astype(
                  np.float32)}
    order = np.argsort(self.keys)
    for fmt in records.TARGET_FORMATS:
      path = os.path.join(self.get_temp_dir(), f"multi_{fmt}")
      write_targets_dir(path, self.keys, values, fmt=fmt)
      keys, got = records.read_targets(path)
      self.assertAllEqual(keys, self.keys[order])
      self.assertEqual(list(got), ["value", "klass"])
      for name in values:
        self.assertEqual(got[name].dtype, np.float32)
        self.assertAllEqual(got[name], values[name][order], msg=(fmt, name))
      wanted = self.keys[[5, 0, 7]]
      _, some = records.read_targets(path, keys=wanted)
      for name in values:
        self.assertAllEqual(some[name], values[name][[5, 0, 7]])
    # The shard digests still guard every output's column.
    manifest = write_targets_dir(path, self.keys, values)
    shard = os.path.join(path, manifest["shards"][0]["file"])
    with open(shard, "rb") as f:
      data = f.read()
    with open(shard, "wb") as f:
      f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with self.assertRaisesRegex(ValueError, "does not match its manifest"):
      records.read_targets(path)

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

  def test_read_scores_takes_format_and_shapes_from_scoring_json(self):
    path = self.get_temp_dir()
    prediction = np.arange(12, dtype=np.float32).reshape(4, 3)
    variation = np.array([0.5, 0.25, 0.125, 1.0], np.float32)
    keys = np.array([7, 2, 9, 4], np.int64)
    with self.assertRaisesRegex(ValueError, "not a finished scoring"):
      records.read_scores(path)
    for part, rows in enumerate([[0, 1], [2, 3]]):
      data = records.encode_shard(
          keys[rows], {"prediction": prediction[rows],
                       "variation": variation[rows]}, records.JSONL)
      with open(os.path.join(path, f"scores-{part:05d}-of-00002.jsonl"),
                "wb") as f:
        f.write(data)
    with open(os.path.join(path, records.SCORING_FILENAME), "w") as f:
      json.dump({"output_format": "jsonl", "num_shards": 2,
                 "output_shapes": {"prediction": [3], "variation": []}}, f)
    got = records.read_scores(path)
    order = np.argsort(keys)
    self.assertEqual(sorted(got), ["key", "prediction", "variation"])
    self.assertAllEqual(got["key"], keys[order])
    self.assertAllEqual(got["prediction"], prediction[order])
    self.assertAllEqual(got["variation"], variation[order])

  def test_read_scores_with_out_of_range(self):
    keys = np.array([7, 2, 9, 4], np.int64)
    scores = {"prediction": np.array([1, 2, 3, 4], np.float32),
              "variation": np.array([0.5, 0.25, 0.125, 1.0], np.float32),
              "out_of_range": np.array([0, 0.75, 0, 2.5], np.float32)}
    self.assertEqual(records.score_names(scores),
                     ("prediction", "variation", "out_of_range"))
    self.assertEqual(records.score_names(["variation", "prediction"]),
                     ("prediction", "variation"))
    for fmt in records.SCORE_FORMATS:
      path = os.path.join(self.get_temp_dir(), f"far_{fmt}")
      os.makedirs(path)
      with open(os.path.join(path, f"scores-00000-of-00001.{fmt}"),
                "wb") as f:
        f.write(records.encode_shard(keys, scores, fmt))
      with open(os.path.join(path, records.SCORING_FILENAME), "w") as f:
        json.dump({"output_format": fmt, "num_shards": 1, "output_shapes": {
            "out_of_range": [], "prediction": [], "variation": []}}, f)
      got = records.read_scores(path)
      self.assertEqual(sorted(got), sorted(("key",) + tuple(scores)))
      order = np.argsort(keys)
      for name, value in scores.items():
        self.assertAllEqual(got[name], value[order], msg=(fmt, name))

  def test_score_output_names(self):
    self.assertEqual(records.score_output_names(["variation", "prediction"]),
                     [])
    self.assertEqual(records.score_output_names(
        ["prediction", "variation", "out_of_range", "logits"]), [])
    two = ["variation/b", "prediction/b", "prediction/a", "variation/a"]
    self.assertEqual(records.score_output_names(two), ["a", "b"])
    self.assertEqual(records.score_output_names(two + ["out_of_range",
                                                       "logits"]),
                     ["a", "b"])
    self.assertEqual(records.score_names(two + ["out_of_range"]),
                     ("prediction/a", "prediction/b", "variation/a",
                      "variation/b", "out_of_range"))
    for outputs in (["prediction"], ["prediction/a", "variation/a"],
                    ["prediction/a", "variation/a", "prediction/b"],
                    ["y", "out_of_range"]):
      self.assertIsNone(records.score_output_names(outputs), msg=outputs)

  def test_read_scores_of_several_outputs(self):
    keys = np.array([7, 2, 9, 4], np.int64)
    scores = {"prediction/klass": np.arange(12, dtype=np.float32).reshape(
        4, 3),
              "prediction/value": np.array([1, 2, 3, 4], np.float32),
              "variation/klass": np.array([0.5, 0.25, 0.125, 1.0],
                                          np.float32),
              "variation/value": np.array([2, 0, 3, 1], np.float32),
              "out_of_range": np.array([0, 0.75, 0, 2.5], np.float32)}
    shapes = {name: list(v.shape[1:]) for name, v in scores.items()}
    self.assertEqual(records.score_names(shapes), tuple(scores))
    order = np.argsort(keys)
    for fmt in records.SCORE_FORMATS:
      path = os.path.join(self.get_temp_dir(), f"multi_{fmt}")
      os.makedirs(path)
      with open(os.path.join(path, f"scores-00000-of-00001.{fmt}"),
                "wb") as f:
        f.write(records.encode_shard(keys, scores, fmt))
      with open(os.path.join(path, records.SCORING_FILENAME), "w") as f:
        json.dump({"output_format": fmt, "num_shards": 1,
                   "output_shapes": shapes,
                   "output_names": ["klass", "value"]}, f)
      got = records.read_scores(path)
      self.assertEqual(list(got), ["key"] + list(scores))
      self.assertAllEqual(got["key"], keys[order])
      for name, value in scores.items():
        self.assertAllEqual(got[name], value[order], msg=(fmt, name))

  def test_serialize_example_sorts_the_feature_map(self):
    def feature(v):
      return tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
    one = records.serialize_example({"b": feature(1.0), "a": feature(2.0)})
    two = records.serialize_example({"a": feature(2.0), "b": feature(1.0)})
    self.assertEqual(one, two)

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

  def test_merge_duplicates_of_several_results(self):
    keys = np.array([5, 3, 5, 9, 3], np.int64)
    first = np.array([1.0, 2.0, 1.0, 4.0, 2.0], np.float32)
    second = np.arange(10, dtype=np.float32).reshape(5, 2)
    second[2] = second[0]
    second[4] = second[1]
    got_keys, got, dropped = records.merge_duplicates(
        keys, {"b": first, "a": second})
    self.assertAllEqual(got_keys, [3, 5, 9])
    self.assertEqual(list(got), ["b", "a"])  # The order given.
    self.assertAllEqual(got["b"], [2.0, 1.0, 4.0])
    self.assertAllEqual(got["a"], [[2, 3], [0, 1], [6, 7]])
    self.assertEqual(dropped, 2)
    # Agreeing in one result is not enough.
    second[4] = [8, 9]
    with self.assertRaisesRegex(ValueError, r"keys \[3\] occur with "
                                "different targets"):
      records.merge_duplicates(keys, {"b": first, "a": second})

  def test_merge_duplicates_of_an_empty_shard(self):
    # A shard no example hashed to (fewer examples than shards).
    keys = np.zeros((0,), np.int64)
    got_keys, got, dropped = records.merge_duplicates(
        keys, np.zeros((0,), np.float32))
    self.assertEqual((got_keys.shape, got.shape, dropped), ((0,), (0,), 0))
    _, got, _ = records.merge_duplicates(
        keys, {"prediction": np.zeros((0, 3), np.float32),
               "variation": np.zeros((0,), np.float32)})
    self.assertEqual(got["prediction"].shape, (0, 3))
    self.assertEqual(got["variation"].shape, (0,))

  def test_write_and_parse_examples_dict_inputs(self):
    model = beam_testing.build_model("dict")
    specs = records.model_input_specs(model)
    self.assertEqual(specs["kind"], "dict")
    self.assertCountEqual([n for n, _, _ in specs["inputs"]],
                          ["user_id", "dense"])
    x = beam_testing.dict_inputs(10)
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
    model = beam_testing.build_model()
    self.assertEqual(records.model_input_specs(model)["inputs"],
                     [["features", "float32", [6]]])
    self.assertEqual(records.model_input_specs(model, "x")["inputs"],
                     [["x", "float32", [6]]])
    with self.assertRaisesRegex(ValueError, "`input_feature`"):
      records.model_input_specs(beam_testing.build_model("dict"), "x")


if __name__ == "__main__":
  tf.test.main()
