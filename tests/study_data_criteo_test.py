"""Tests for dropvar_tf.study.data.criteo."""

import gzip
import os

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study.data import common
from dropvar_tf.study.data import criteo

# A hand-written labelled line: I1 and I12 missing, I2 = -1; C2, C22 and C26
# missing.
_LINE = ("1\t\t-1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t"
         "68fd1e64\t\t4f25e98b\tf7c1b33f\t25c83c98\t7e0ccccf\tde7995b8\t"
         "1f89b1b9\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t"
         "1adce6ef\t8ba8b39a\t891b62e7\te5ba7672\tf54016b9\t21ddcdc9\t"
         "b1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t")


class PreprocessTest(tf.test.TestCase):

  def test_hand_written_line(self):
    path = os.path.join(self.get_temp_dir(), "one.tsv")
    with open(path, "w") as f:
      f.write(_LINE + "\n")
    (x, y), = criteo.criteo_dataset(path, num_buckets=100).as_numpy_iterator()
    self.assertAllEqual(y, [1.0])
    raw = [0, -1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    self.assertAllClose(x["dense"][0], np.log1p(np.maximum(raw, 0)))
    cat = x["cat"][0]
    self.assertEqual(x["cat"].dtype, np.int64)
    self.assertEqual(cat[1], criteo.MISSING_ID)
    self.assertEqual(cat[21], criteo.MISSING_ID)
    self.assertEqual(cat[25], criteo.MISSING_ID)
    self.assertAllInRange(np.delete(cat, [1, 21, 25]), 1, 99)
    # The stable FarmHash fingerprint: the same id on every run and machine.
    self.assertEqual(
        cat[0],
        1 + tf.strings.to_hash_bucket_fast(["68fd1e64"], 99).numpy()[0])

  def test_num_buckets_per_column(self):
    dense = tf.zeros((2, 13))
    cat = tf.constant([["a"] * 26, [""] * 26])
    buckets = [2] * 13 + [1000] * 13
    x = criteo.preprocess(dense, cat, buckets)
    self.assertAllEqual(x["cat"][0, :13], [1] * 13)
    self.assertAllEqual(x["cat"][1], [0] * 26)

  def test_bad_num_buckets(self):
    with self.assertRaisesRegex(
        ValueError, "Invalid value received for argument `num_buckets`"):
      criteo.check_num_buckets(1)
    with self.assertRaisesRegex(ValueError, "argument `num_buckets`"):
      criteo.check_num_buckets([10] * 25)


class SyntheticTest(tf.test.TestCase):

  def test_layout_and_ctr(self):
    split = criteo.make_synthetic_criteo(20_000, seed=0)
    self.assertIsInstance(split, common.Split)
    self.assertEqual(split.x_train["dense"].shape, (16_000, 13))
    self.assertEqual(split.x_train["dense"].dtype, np.float32)
    self.assertEqual(split.x_test["cat"].shape, (4_000, 26))
    self.assertEqual(split.x_test["cat"].dtype, np.int64)
    self.assertEqual(split.y_train.dtype, np.float32)
    self.assertAllInSet(split.y_train, [0.0, 1.0])
    self.assertNear(split.y_train.mean(), 0.25, 0.03)
    self.assertEqual(split.info["kind"], common.BINARY)
    self.assertEqual(split.info["data"], "synthetic")
    self.assertAllInRange(split.x_train["cat"], 0,
                          criteo.DEFAULT_NUM_BUCKETS - 1)
    self.assertGreaterEqual(split.x_train["dense"].min(), 0.0)

  def test_missing_rates_and_zipf_frequencies(self):
    records = criteo.synthetic_criteo_records(20_000, seed=1)
    missing = (records.tokens < 0).mean(axis=0)
    self.assertNear(missing[21], 0.76, 0.03)  # C22
    self.assertEqual(missing[0], 0.0)
    self.assertNear(np.isnan(records.dense[:, 11]).mean(), 0.77, 0.03)
    # Heavy head: the commonest C3 value is far more frequent than the median.
    counts = np.bincount(records.tokens[records.tokens[:, 2] >= 0, 2])
    counts = np.sort(counts[counts > 0])[::-1]
    self.assertGreater(counts[0], 50 * np.median(counts))
    # I2 has negative counts, as in the real data.
    self.assertLess(np.nanmin(records.dense[:, 1]), 0)

  def test_labels_depend_on_features(self):
    records = criteo.synthetic_criteo_records(20_000, seed=2)
    # C9 has 3 values with different hidden effects: CTR differs between them.
    ctr = [records.label[records.tokens[:, 8] == v].mean() for v in range(3)]
    self.assertGreater(max(ctr) - min(ctr), 0.02)

  def test_seeds(self):
    a = criteo.make_synthetic_criteo(500, seed=3)
    b = criteo.make_synthetic_criteo(500, seed=3)
    c = criteo.make_synthetic_criteo(500, seed=4)
    self.assertAllEqual(a.x_train["cat"], b.x_train["cat"])
    self.assertAllEqual(a.y_test, b.y_test)
    self.assertNotAllEqual(a.x_train["cat"], c.x_train["cat"])
    # One world: the same hex values whatever the row seed.
    ra = criteo.synthetic_criteo_records(10, seed=3)
    rc = criteo.synthetic_criteo_records(10, seed=4)
    self.assertAllEqual(ra.vocab[0], rc.vocab[0])


class TsvRoundTripTest(tf.test.TestCase):

  def _write(self, name, n=600, seed=5):
    records = criteo.synthetic_criteo_records(n, seed=seed)
    return criteo.write_criteo_tsv(os.path.join(self.get_temp_dir(), name),
                                   records)

  def test_file_is_in_the_real_format(self):
    path = self._write("day_0.tsv", n=50)
    with open(path) as f:
      lines = f.read().splitlines()
    self.assertLen(lines, 50)
    for line in lines:
      fields = line.split("\t")
      self.assertLen(fields, 40)
      self.assertIn(fields[0], ("0", "1"))
      for value in fields[1:14]:
        if value:
          int(value)
      for value in fields[14:]:
        self.assertIn(len(value), (0, 8))
        if value:
          int(value, 16)

  def test_loader_reproduces_the_generator(self):
    path = self._write("day_0.tsv")
    loaded = criteo.load_criteo_tsv(path, num_buckets=500, seed=5)
    made = criteo.make_synthetic_criteo(600, seed=5, num_buckets=500)
    for key in ("dense", "cat"):
      self.assertAllEqual(loaded.x_train[key], made.x_train[key])
      self.assertAllEqual(loaded.x_test[key], made.x_test[key])
    self.assertAllEqual(loaded.y_train, made.y_train)
    self.assertEqual(loaded.info["source"], "load_criteo_tsv")
    self.assertEqual(loaded.info["num_buckets"], (500,) * 26)

  def test_gzip_glob_and_streaming(self):
    plain = self._write("part_0.tsv", n=300, seed=6)
    with open(plain, "rb") as src, gzip.open(
        os.path.join(self.get_temp_dir(), "part_1.tsv.gz"), "wb") as dst:
      dst.write(src.read())
    glob = os.path.join(self.get_temp_dir(), "part_1.tsv.gz")
    ds = criteo.criteo_dataset(glob, batch_size=128, num_buckets=64)
    batches = list(ds.as_numpy_iterator())
    self.assertEqual([len(y) for _, y in batches], [128, 128, 44])
    self.assertEqual(batches[0][0]["cat"].shape, (128, 26))
    direct = list(criteo.criteo_dataset(plain, batch_size=128,
                                        num_buckets=64).as_numpy_iterator())
    self.assertAllEqual(batches[1][0]["cat"], direct[1][0]["cat"])
    split = criteo.load_criteo_tsv(
        os.path.join(self.get_temp_dir(), "part_*"), num_buckets=64,
        max_rows=400)
    self.assertEqual(len(split.y_train) + len(split.y_test), 400)
    self.assertLen(split.info["files"], 2)

  def test_unlabelled_test_file(self):
    path = os.path.join(self.get_temp_dir(), "test.txt")
    with open(path, "w") as f:
      f.write(_LINE.split("\t", 1)[1] + "\n")
    (x,) = list(criteo.criteo_dataset(path, has_label=False)
                .as_numpy_iterator())
    self.assertEqual(x["dense"].shape, (1, 13))

  def test_split_is_deterministic(self):
    path = self._write("day_0.tsv")
    a = criteo.load_criteo_tsv(path, seed=1)
    b = criteo.load_criteo_tsv(path, seed=1)
    c = criteo.load_criteo_tsv(path, seed=2)
    self.assertAllEqual(a.x_test["cat"], b.x_test["cat"])
    self.assertNotAllEqual(a.x_test["cat"], c.x_test["cat"])

  def test_clear_errors(self):
    with self.assertRaisesRegex(FileNotFoundError, "No Criteo TSV file"):
      criteo.load_criteo_tsv(os.path.join(self.get_temp_dir(), "none_*"))
    path = os.path.join(self.get_temp_dir(), "bad.tsv")
    with open(path, "w") as f:
      f.write("1,2,3\n")
    with self.assertRaisesRegex(ValueError, "1 tab-separated fields, expected "
                                "40"):
      criteo.load_criteo_tsv(path)
    with open(path, "w") as f:
      f.write("\n")
    with self.assertRaisesRegex(ValueError, "is empty"):
      criteo.load_criteo_tsv(path)
    with open(path, "w") as f:
      f.write(_LINE + "\n" + _LINE.replace("\t5\t", "\tfive\t", 1) + "\n")
    with self.assertRaisesRegex(ValueError, "Malformed Criteo TSV line"):
      criteo.load_criteo_tsv(path)
    with open(path, "w") as f:
      f.write("2" + _LINE[1:] + "\n")
    with self.assertRaisesRegex(ValueError, "expected 0 or 1"):
      criteo.load_criteo_tsv(path)


if __name__ == "__main__":
  tf.test.main()
