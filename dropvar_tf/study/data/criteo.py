"""Criteo click-through data: the Display Advertising Challenge TSV, synthetic.

File format (one ad impression per line, tab-separated, no header):
`label<TAB>I1..I13<TAB>C1..C26`: a 0/1 click label, 13 integer count features
and 26 categorical features given as 8-digit hex hashes; any field but the
label may be empty (missing). The challenge's test file has no label column.

Feature layout produced by every loader here (`x`):
- `x["dense"]`: float32 (N, 13), `log(1 + max(I, 0))`, missing -> 0.
- `x["cat"]`: int64 (N, 26); column j holds the id of C(j+1) in
  [0, num_buckets[j]): 0 is "missing", other values are
  `1 + fingerprint(value) mod (num_buckets[j] - 1)`
  (`tf.strings.to_hash_bucket_fast`, a stable FarmHash fingerprint), so ids
  are the same on every machine and run without a stored vocabulary.
- y: float32 (N,) in {0, 1}.

No Criteo data ships anywhere we can install offline, so
`make_synthetic_criteo` draws Criteo-like data (count-like dense features,
Zipf-distributed categoricals with Criteo's missing rates, a click from a hidden
logistic model with interactions, CTR about 0.25), and `write_criteo_tsv`
writes such data in the real file format so that the TSV loader can be tested
end to end.
"""

import functools
import gzip
import os
from typing import NamedTuple

import numpy as np

from dropvar_tf._keras import tf
from dropvar_tf.study.data import common
from dropvar_tf.validation import check_int, invalid

NUM_DENSE = 13
NUM_CATEGORICAL = 26
DENSE_COLUMNS = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
CAT_COLUMNS = tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))
DENSE_KEY = "dense"
CAT_KEY = "cat"
DEFAULT_NUM_BUCKETS = 10_000
MISSING_ID = 0

# Per-column missing rates and cardinalities of the Kaggle Display
# Advertising Challenge training file (45.8M rows), rounded; the synthetic
# generator imitates them, capping cardinalities at `max_vocab`.
_DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04,
                  0.45, 0.04, 0.77, 0.22)
_CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76,
                0.0, 0.03, 0.44, 0.44)
_CAT_CARDINALITY = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3,
                    93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10, 5652,
                    2173, 4, 7046547, 18, 15, 286181, 105, 142572)
# Column pairs whose latent factors interact in the synthetic click model
# (user-like x ad-like columns), and the dense column that modulates one
# categorical effect.
_INTERACTING_PAIRS = ((0, 1), (4, 13), (6, 10), (2, 15))
_TARGET_CTR = 0.25


def check_num_buckets(num_buckets):
  """Returns `num_buckets` as a tuple of 26 ints >= 2 (one per C column)."""
  if isinstance(num_buckets, (list, tuple, np.ndarray)):
    values = tuple(num_buckets)
    if len(values) != NUM_CATEGORICAL:
      raise invalid("num_buckets", f"an int >= 2 or {NUM_CATEGORICAL} ints "
                    ">= 2", num_buckets)
  else:
    values = (num_buckets,) * NUM_CATEGORICAL
  try:
    return tuple(check_int(v, "num_buckets", 2) for v in values)
  except ValueError:
    raise invalid("num_buckets", f"an int >= 2 or {NUM_CATEGORICAL} ints >= 2",
                  num_buckets) from None


def preprocess(dense, cat, num_buckets=DEFAULT_NUM_BUCKETS):
  """Turns raw Criteo fields into model features (TF ops, batched).

  Args:
    dense: float tensor (B, 13) of raw integer counts, missing already 0.
    cat: string tensor (B, 26) of raw hex values, missing as "".
    num_buckets: int or 26 ints, hash buckets per categorical column
      (bucket 0 is reserved for "missing").

  Returns:
    {"dense": float32 (B, 13), "cat": int64 (B, 26)} as in the module
    docstring.
  """
  buckets = check_num_buckets(num_buckets)
  dense = tf.math.log1p(tf.maximum(tf.cast(dense, tf.float32), 0.0))
  columns = []
  for j, nb in enumerate(buckets):
    values = cat[:, j]
    ids = tf.strings.to_hash_bucket_fast(values, nb - 1) + 1
    columns.append(tf.where(values == "", tf.constant(MISSING_ID, tf.int64),
                            ids))
  return {DENSE_KEY: dense, CAT_KEY: tf.stack(columns, axis=1)}


def _resolve_files(path_or_glob):
  """Returns the sorted files matching a path, glob, or list of them."""
  patterns = ([path_or_glob] if isinstance(path_or_glob, (str, os.PathLike))
              else list(path_or_glob))
  files = []
  for pattern in patterns:
    files.extend(tf.io.gfile.glob(os.fspath(pattern)))
  files = sorted(set(files))
  if not files:
    raise FileNotFoundError(
        f"No Criteo TSV file matches {path_or_glob!r}.")
  return files


def _compression(path, compression_type):
  if compression_type is not None:
    return compression_type
  return "GZIP" if str(path).endswith(".gz") else ""


def _check_first_line(path, compression_type, has_label):
  """Fails fast, with a clear message, on a file that is not Criteo TSV."""
  opener = gzip.open if compression_type == "GZIP" else open
  try:
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
      line = f.readline().rstrip("\n").rstrip("\r")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"Cannot read {path!r} as Criteo TSV text: {e}") from e
  if not line:
    raise ValueError(f"Criteo TSV file {path!r} is empty.")
  expected = NUM_DENSE + NUM_CATEGORICAL + int(has_label)
  fields = line.split("\t")
  if len(fields) != expected:
    raise ValueError(
        f"{path!r} is not Criteo TSV: its first line has {len(fields)} "
        f"tab-separated fields, expected {expected} ("
        f"{'label, ' if has_label else ''}I1..I13, C1..C26).")
  if has_label and fields[0] not in ("0", "1"):
    raise ValueError(f"{path!r} is not Criteo TSV: the first field (label) "
                     f"is {fields[0]!r}, expected 0 or 1.")


def criteo_dataset(path_or_glob, batch_size=1024,
                   num_buckets=DEFAULT_NUM_BUCKETS, has_label=True,
                   shuffle_buffer=None, seed=None, compression_type=None,
                   drop_remainder=False):
  """Streams Criteo TSV files as batches of model features.

  Files are read in sorted name order with `tf.data.experimental.CsvDataset`
  (a C++ parser), so files far larger than memory stream fine.

  Args:
    path_or_glob: a file, a glob such as "day_*.gz", or a list of them.
    batch_size: rows per batch.
    num_buckets: int or 26 ints, hash buckets per categorical column.
    has_label: the files start with a label column (the challenge's training
      file does, its test file does not).
    shuffle_buffer: if set, shuffle rows through a buffer of this size.
    seed: shuffle seed.
    compression_type: "", "GZIP" or "ZLIB"; None picks GZIP for ".gz" names.
    drop_remainder: drop a last partial batch.

  Returns:
    A `tf.data.Dataset` of `(x, y)` with x = {"dense": float32 (B, 13),
    "cat": int64 (B, 26)} and y float32 (B,); of `x` alone when not
    `has_label`.

  Raises:
    FileNotFoundError: nothing matches `path_or_glob`.
    ValueError: the first line of a file is not Criteo TSV, or an argument
      is invalid. A malformed later line raises
      `tf.errors.InvalidArgumentError` while iterating.
  """
  batch_size = check_int(batch_size, "batch_size", 1)
  buckets = check_num_buckets(num_buckets)
  files = _resolve_files(path_or_glob)
  defaults = ([tf.constant([], tf.float32)] if has_label else [])
  defaults += [tf.constant(0.0, tf.float32)] * NUM_DENSE
  defaults += [tf.constant("", tf.string)] * NUM_CATEGORICAL
  ds = None
  # One reader per file: a glob may mix plain and gzipped files.
  for path in files:
    compression = _compression(path, compression_type)
    _check_first_line(path, compression, has_label)
    part = tf.data.experimental.CsvDataset(
        path, defaults, compression_type=compression, field_delim="\t",
        use_quote_delim=False, na_value="")
    ds = part if ds is None else ds.concatenate(part)
  if shuffle_buffer:
    ds = ds.shuffle(check_int(shuffle_buffer, "shuffle_buffer", 1), seed=seed)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)

  def parse(*fields):
    offset = int(has_label)
    dense = tf.stack(fields[offset:offset + NUM_DENSE], axis=1)
    cat = tf.stack(fields[offset + NUM_DENSE:], axis=1)
    x = preprocess(dense, cat, buckets)
    return (x, fields[0]) if has_label else x

  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
      tf.data.AUTOTUNE)


def load_criteo_tsv(path_or_glob, num_buckets=DEFAULT_NUM_BUCKETS,
                    test_fraction=0.2, seed=0, max_rows=None,
                    compression_type=None):
  """Reads labelled Criteo TSV files into a numpy `Split` (small files).

  Args:
    path_or_glob: a file, a glob, or a list of them.
    num_buckets: int or 26 ints, hash buckets per categorical column.
    test_fraction: share of rows held out for testing.
    seed: seed of the random train/test partition.
    max_rows: read at most this many rows (the first ones); None reads all.
    compression_type: as in `criteo_dataset`.

  Returns:
    A `Split` with the layout of the module docstring; info holds
    "num_buckets" (26 ints), "vocab_sizes" ({"C1": ..}), "files".

  Raises:
    FileNotFoundError: nothing matches `path_or_glob`.
    ValueError: a line is not Criteo TSV, or an argument is invalid.
  """
  buckets = check_num_buckets(num_buckets)
  files = _resolve_files(path_or_glob)
  ds = criteo_dataset(files, batch_size=8192, num_buckets=buckets,
                      compression_type=compression_type)
  if max_rows is not None:
    ds = ds.unbatch().take(check_int(max_rows, "max_rows", 2)).batch(8192)
  dense, cat, labels = [], [], []
  try:
    for x, y in ds.as_numpy_iterator():
      dense.append(x[DENSE_KEY])
      cat.append(x[CAT_KEY])
      labels.append(y)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(
        f"Malformed Criteo TSV line in {path_or_glob!r}: {e.message}") from e
  x = {DENSE_KEY: np.concatenate(dense), CAT_KEY: np.concatenate(cat)}
  y = np.concatenate(labels).astype(np.float32)
  if not np.isin(y, (0.0, 1.0)).all():
    raise ValueError(f"Criteo labels must be 0 or 1; {path_or_glob!r} has "
                     f"{sorted(set(np.unique(y).tolist()) - {0.0, 1.0})}.")
  return _split(x, y, test_fraction, seed, buckets,
                {"source": "load_criteo_tsv", "data": files[0] if len(files)
                 == 1 else files, "files": files})


def _split(x, y, test_fraction, seed, buckets, info):
  train, test = common.split_indices(len(y), test_fraction, seed)
  out_info = {
      "kind": common.BINARY,
      "num_dense": NUM_DENSE,
      "num_buckets": buckets,
      "vocab_sizes": dict(zip(CAT_COLUMNS, buckets)),
      "num_rows": len(y),
      "ctr_train": float(y[train].mean()),
  }
  out_info.update(info)
  return common.Split(common.take(x, train), y[train], common.take(x, test),
                      y[test], out_info)


class CriteoRecords(NamedTuple):
  """Raw synthetic Criteo rows, before hashing.

  Attributes:
    label: int64 (N,), 0 or 1.
    dense: float64 (N, 13) integer counts, NaN where missing.
    tokens: int64 (N, 26) token index per column, -1 where missing.
    vocab: 26 arrays of 8-digit hex strings; token t of column j is written
      as vocab[j][t].
  """
  label: np.ndarray
  dense: np.ndarray
  tokens: np.ndarray
  vocab: tuple


class _World(NamedTuple):
  """The fixed hidden structure that synthetic rows are drawn from."""
  vocab: tuple          # 26 arrays of hex strings
  token_probs: tuple    # 26 Zipf probability vectors
  token_effect: tuple   # 26 float arrays, logit effect per token
  factors: tuple        # 26 arrays (vocab, 4) of latent factors
  dense_mu: np.ndarray
  dense_sigma: np.ndarray
  dense_load: np.ndarray
  dense_weight: np.ndarray
  bias: float


def _zipf_probs(size, exponent):
  p = 1.0 / np.arange(1, size + 1) ** exponent
  return p / p.sum()


@functools.lru_cache(maxsize=4)
def _world(world_seed, max_vocab):
  rng = np.random.default_rng([world_seed, 7919])
  vocab, probs, effect, factors = [], [], [], []
  for card in _CAT_CARDINALITY:
    size = int(min(card, max_vocab))
    # Distinct 32-bit values, written like Criteo's hex hashes.
    values = rng.choice(2**32, size=size, replace=False)
    vocab.append(np.array([f"{v:08x}" for v in values]))
    probs.append(_zipf_probs(size, rng.uniform(1.05, 1.4)))
    effect.append(rng.normal(0.0, rng.uniform(0.1, 0.6), size))
    factors.append(rng.normal(0.0, 0.5, (size, 4)))
  world = _World(
      vocab=tuple(vocab), token_probs=tuple(probs), token_effect=tuple(effect),
      factors=tuple(factors),
      dense_mu=rng.uniform(0.0, 4.0, NUM_DENSE),
      dense_sigma=rng.uniform(0.5, 1.5, NUM_DENSE),
      dense_load=rng.uniform(-0.8, 0.8, NUM_DENSE),
      dense_weight=rng.normal(0.0, 0.25, NUM_DENSE),
      bias=0.0)
  # Choose the intercept so that the mean click probability is the target.
  _, _, logit = _draw(world, 50_000, np.random.default_rng([world_seed, 1]))
  lo, hi = -20.0, 20.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if np.mean(1 / (1 + np.exp(-(logit + mid)))) < _TARGET_CTR:
      lo = mid
    else:
      hi = mid
  return world._replace(bias=(lo + hi) / 2)


def _draw(world, n, rng):
  """Draws n raw rows; returns (counts, tokens, click logit without bias)."""
  activity = rng.normal(size=(n, 1))
  counts = np.floor(rng.lognormal(world.dense_mu + world.dense_load * activity,
                                  world.dense_sigma))
  # I2 has small negative values in the real data.
  counts[rng.random(n) < 0.1, 1] = -1
  counts[rng.random((n, NUM_DENSE)) < np.array(_DENSE_MISSING)] = np.nan
  tokens = np.empty((n, NUM_CATEGORICAL), np.int64)
  for j in range(NUM_CATEGORICAL):
    tokens[:, j] = rng.choice(len(world.vocab[j]), size=n,
                              p=world.token_probs[j])
  tokens[rng.random((n, NUM_CATEGORICAL)) < np.array(_CAT_MISSING)] = -1
  present = tokens >= 0
  logs = np.log1p(np.maximum(np.nan_to_num(counts, nan=0.0), 0.0))
  logit = logs @ world.dense_weight
  for j in range(NUM_CATEGORICAL):
    logit += np.where(present[:, j],
                      world.token_effect[j][np.maximum(tokens[:, j], 0)], 0.0)
  for a, b in _INTERACTING_PAIRS:
    fa = world.factors[a][np.maximum(tokens[:, a], 0)]
    fb = world.factors[b][np.maximum(tokens[:, b], 0)]
    logit += np.where(present[:, a] & present[:, b], (fa * fb).sum(1), 0.0)
  # A dense x categorical interaction: C6's effect grows with I1.
  logit += 0.3 * logs[:, 0] * np.where(
      present[:, 5], world.token_effect[5][np.maximum(tokens[:, 5], 0)], 0.0)
  return counts, tokens, logit


def synthetic_criteo_records(n, seed=0, world_seed=0, max_vocab=10_000):
  """Draws raw Criteo-like rows (before hashing).

  The hidden structure (token hex values, Zipf frequencies, click model) is
  fixed by `world_seed`; `seed` draws the rows. So files drawn with different
  `seed` and one `world_seed` are train/test samples of one distribution.

  Args:
    n: number of rows, >= 1.
    seed: row seed.
    world_seed: seed of the hidden structure.
    max_vocab: cap on each column's number of distinct values.

  Returns:
    `CriteoRecords`.
  """
  n = check_int(n, "n", 1)
  world = _world(check_int(world_seed, "world_seed", 0),
                 check_int(max_vocab, "max_vocab", 2))
  rng = np.random.default_rng([seed, 104729])
  counts, tokens, logit = _draw(world, n, rng)
  prob = 1 / (1 + np.exp(-(logit + world.bias)))
  label = (rng.random(n) < prob).astype(np.int64)
  return CriteoRecords(label, counts, tokens, world.vocab)


def records_features(records, num_buckets=DEFAULT_NUM_BUCKETS):
  """Returns the model features of raw records, as the TSV loader makes them.

  Each column's distinct values are hashed once with `preprocess`, then
  indexed, so the ids equal those the TSV loader computes from the strings.
  """
  buckets = check_num_buckets(num_buckets)
  # The same TF ops as the TSV path, so that both give bit-equal features.
  dense = tf.math.log1p(tf.maximum(tf.constant(
      np.nan_to_num(records.dense, nan=0.0), tf.float32), 0.0)).numpy()
  cat = np.zeros(records.tokens.shape, np.int64)
  for j, nb in enumerate(buckets):
    table = tf.strings.to_hash_bucket_fast(records.vocab[j], nb - 1).numpy() + 1
    present = records.tokens[:, j] >= 0
    cat[present, j] = table[records.tokens[present, j]]
  return {DENSE_KEY: dense, CAT_KEY: cat}


def make_synthetic_criteo(n, seed=0, num_buckets=DEFAULT_NUM_BUCKETS,
                          test_fraction=0.2, world_seed=0, max_vocab=10_000):
  """Criteo-like click data with the TSV loader's feature layout.

  Args:
    n: number of rows, >= 2.
    seed: seed of the rows and of the train/test partition.
    num_buckets: int or 26 ints, hash buckets per categorical column.
    test_fraction: share of rows held out for testing.
    world_seed: seed of the hidden structure (see
      `synthetic_criteo_records`).
    max_vocab: cap on each column's number of distinct values.

  Returns:
    A `Split` with x = {"dense": float32 (N, 13), "cat": int64 (N, 26)}, y
    float32 clicks (mean about 0.25); info["data"] == "synthetic".

  Example:

  >>> split = make_synthetic_criteo(1000, seed=0)
  >>> split.x_train["cat"].shape
  (800, 26)
  """
  buckets = check_num_buckets(num_buckets)
  records = synthetic_criteo_records(check_int(n, "n", 2), seed, world_seed,
                                     max_vocab)
  x = records_features(records, buckets)
  return _split(x, records.label.astype(np.float32), test_fraction, seed,
                buckets, {"source": "make_synthetic_criteo",
                          "data": "synthetic", "world_seed": world_seed})


def write_criteo_tsv(path, records):
  """Writes records in the Criteo challenge TSV format.

  Missing values are written as empty fields; a ".gz" path is gzipped.

  Args:
    path: output file.
    records: `CriteoRecords` (e.g. from `synthetic_criteo_records`).

  Returns:
    `path`.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8", newline="\n") as f:
    for i in range(len(records.label)):
      fields = [str(int(records.label[i]))]
      fields += ["" if np.isnan(v) else str(int(v)) for v in records.dense[i]]
      fields += ["" if t < 0 else records.vocab[j][t]
                 for j, t in enumerate(records.tokens[i])]
      f.write("\t".join(fields) + "\n")
  return path
