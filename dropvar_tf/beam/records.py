"""Keyed example and target files of the Beam pipelines (no Beam needed).

Everything here runs without `apache_beam`, so that `read_targets` and the
input adapters work in any environment that has dropvar_tf:

* Input examples: TFRecord files of `tf.train.Example`, one per example, with
  one feature per model input (named as `model_input_specs` says) and a
  stable int64 key feature (default "key"). `write_examples` turns the arrays
  of any task loader (`load_criteo_tsv`, `make_synthetic_criteo`,
  `load_digits`, MovieLens...) into such files.
* Targets output: a directory of `num_shards` shard files
  `targets-SSSSS-of-NNNNN.{tfrecord,parquet}` (key and "target" per
  example; "target/<output name>" per output of a model of several
  outputs), plus `settings.json` (what was computed) and, once every shard
  is written, `manifest.json` (per-shard counts and sha256). Example key k
  lives in shard `shard_of(k, num_shards)`; each shard file is sorted by key
  and written atomically, so a shard's bytes depend only on the examples
  and the settings, never on the runner, the bundling or on how many times
  the shard was retried.
* Scores output: `scores-*.{parquet,tfrecord,jsonl}` (key, prediction,
  variation, and out_of_range when the signature returns it; a dual of
  several outputs has "prediction/<output name>" and "variation/<output
  name>" per output in place of prediction and variation) and
  `scoring.json` (format and per-example shapes; "output_names" for
  several outputs); `read_scores(path)` reads them back.
* `read_targets(path)` checks the manifest, every shard's digest, that each
  key lives in its own shard, and that no key is duplicated or missing, then
  returns (keys, targets) ordered by key: what `fit_variation_head` takes
  (targets a dict keyed by output name for a model of several outputs).

Example:

```python
files = write_examples("/data/calib/examples", split.x_test,
                       input_specs=model_input_specs(model), num_shards=4)
# ... python -m dropvar_tf.beam.targets_pipeline --input ... --output out/
keys, dpv = read_targets("out/")          # keys 0..N-1 when written above
fit_variation_head(dual, split.x_test, dpv)
```
"""

import hashlib
import io
import json
import os
import posixpath
import tempfile

import numpy as np

from dropvar_tf import contract
from dropvar_tf import keras_graph
from dropvar_tf import validation
from dropvar_tf._keras import tf
from dropvar_tf.beam.formats import JSONL
from dropvar_tf.beam.formats import KEY_FEATURE
from dropvar_tf.beam.formats import PARQUET
from dropvar_tf.beam.formats import SCORE_FORMATS
from dropvar_tf.beam.formats import TARGET_FORMATS  # noqa: F401 (records.X)
from dropvar_tf.beam.formats import TFRECORD

TARGET_FEATURE = "target"

SETTINGS_FILENAME = "settings.json"
MANIFEST_FILENAME = "manifest.json"
SHARD_PREFIX = "targets"
SCORING_FILENAME = "scoring.json"
SCORES_PREFIX = "scores"

FORMAT_VERSION = 1

# Records read per step when decoding a TFRecord shard.
_READ_BATCH = 65536

# 64-bit golden-ratio multiplier (Fibonacci hashing): spreads keys that share
# a stride (all even, all multiples of num_shards) evenly over the shards.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------------------
# Sharding.


def shard_of(keys, num_shards):
  """Shard index of each example key (a pure function of key and count).

  Args:
    keys: int64 array-like of example keys, any shape.
    num_shards: integer >= 1.

  Returns:
    int64 array of the shape of `keys`, values in [0, num_shards).
  """
  num_shards = validation.check_int(num_shards, "num_shards", 1)
  keys = np.asarray(keys, np.int64).astype(np.uint64)
  with np.errstate(over="ignore"):
    mixed = (keys * _GOLDEN) >> np.uint64(32)
  return (mixed % np.uint64(num_shards)).astype(np.int64)


def shard_filename(index, num_shards, fmt, prefix=SHARD_PREFIX):
  """Name of shard `index`, e.g. "targets-00003-of-00008.tfrecord"."""
  return f"{prefix}-{index:05d}-of-{num_shards:05d}.{fmt}"


def check_format(fmt, allowed, arg="output_format"):
  if fmt not in allowed:
    raise validation.invalid(arg, f"one of {allowed}", fmt)
  return fmt


def score_output_names(outputs):
  """The output names of a dual whose signature returns `outputs`.

  Args:
    outputs: names of a signature's outputs (any iterable, e.g. a dict).

  Returns:
    `[]` when `outputs` hold `contract.OUTPUT_KEYS` (a dual of one output);
    the sorted output names when they hold "prediction/<name>" and
    "variation/<name>" for each of two or more names and no other such
    key (a dual of several outputs, `contract.output_names`); None for
    anything else. Other outputs (e.g. "out_of_range") do not count.
  """
  outputs = set(outputs)
  if set(contract.OUTPUT_KEYS) <= outputs:
    return []
  prefixes = tuple(kind + contract.OUTPUT_SEPARATOR
                   for kind in contract.OUTPUT_KEYS)
  return contract.output_names(k for k in outputs if k.startswith(prefixes))


def score_names(outputs):
  """The score columns that signature `outputs` hold, in file order.

  Args:
    outputs: names of a signature's outputs (any iterable, e.g. a dict).

  Returns:
    `contract.OUTPUT_KEYS`, or for a dual of several outputs
    (`score_output_names`) its "prediction/<name>" and "variation/<name>"
    keys (`contract.output_keys`: sorted); then `contract.OUT_OF_RANGE_KEY`
    when `outputs` has it: what the scoring pipeline writes per example.
  """
  outputs = set(outputs)
  names = score_output_names(outputs)
  extra = (contract.OUT_OF_RANGE_KEY,) if (
      contract.OUT_OF_RANGE_KEY in outputs) else ()
  return contract.output_keys(names or None) + extra


def target_feature(output_name=None):
  """Feature (column) of a target: "target", or "target/<output name>"."""
  if output_name is None:
    return TARGET_FEATURE
  return f"{TARGET_FEATURE}{contract.OUTPUT_SEPARATOR}{output_name}"


def target_features(target_shape, output_names=None):
  """{feature name: per-example shape} of a targets run's shard files.

  Args:
    target_shape: the run's `target_shape` setting: one shape (a list), or
      for a model of several outputs a dict {output name: shape}.
    output_names: the outputs' names in the model's order (the run's
      `output_names` setting); None for one output.

  Returns:
    {"target": shape}, or {"target/<name>": shape} per output name.
  """
  if output_names is None:
    return {TARGET_FEATURE: tuple(target_shape)}
  return {target_feature(name): tuple(target_shape[name])
          for name in output_names}


# ---------------------------------------------------------------------------
# Input examples: specs, writing and parsing tf.Example records.


def _tensor_entries(model):
  """[(name, keras tensor)] and the structure kind of `model`'s inputs."""
  struct = keras_graph.model_input(model)
  if isinstance(struct, dict):
    return list(struct.items()), "dict"
  if isinstance(struct, (list, tuple)):
    return [(t.name, t) for t in struct], "list"
  return [(struct.name, struct)], "single"


def model_input_specs(model, input_feature=None):
  """Feature names, dtypes and per-example shapes of a Keras model's inputs.

  Dict inputs are named by their dict keys, list inputs by their
  `keras.Input` names; a single-input model by its `keras.Input` name unless
  `input_feature` renames it (useful when the name was generated by Keras).

  Args:
    model: a built Functional or Sequential `keras.Model`.
    input_feature: optional feature name of a single-input model's input.

  Returns:
    dict {"kind": "single"|"list"|"dict", "inputs": [[name, dtype name,
    per-example shape list], ...]}: JSON-able, so pipelines can ship it.

  Raises:
    ValueError: a per-example dimension is not static, names repeat, or
      `input_feature` is given for a model with several inputs.
  """
  entries, kind = _tensor_entries(model)
  if input_feature is not None:
    if kind != "single" and len(entries) != 1:
      raise validation.invalid(
          "input_feature", "None for a model with several inputs (features "
          "are named after its inputs)", input_feature)
    entries = [(input_feature, entries[0][1])]
  inputs = []
  for name, tensor in entries:
    shape = list(tensor.shape[1:])
    if any(d is None for d in shape):
      raise validation.invalid(
          "model", "inputs with static per-example shapes (tf.Example "
          "features are fixed-length)", f"input {name!r} of shape "
          f"{tuple(tensor.shape)}")
    inputs.append([name, tf.as_dtype(tensor.dtype).name, [int(d) for d in
                                                          shape]])
  names = [n for n, _, _ in inputs]
  if len(set(names)) != len(names):
    raise validation.invalid("model", "inputs with unique names",
                             f"input names {names}")
  return {"kind": kind, "inputs": inputs}


def signature_input_specs(signature):
  """`model_input_specs`-style specs of a SavedModel signature's inputs.

  Args:
    signature: a concrete function from `loaded.signatures[...]`.

  Returns:
    dict {"kind": "dict", "inputs": [[name, dtype name, shape list], ...]}.

  Raises:
    ValueError: a per-example dimension is not static.
  """
  inputs = []
  for name, spec in sorted(signature.structured_input_signature[1].items()):
    shape = list(spec.shape[1:])
    if any(d is None for d in shape):
      raise validation.invalid(
          "saved_model", "signature inputs with static per-example shapes",
          f"input {name!r} of shape {spec.shape}")
    inputs.append([name, spec.dtype.name, [int(d) for d in shape]])
  return {"kind": "dict", "inputs": inputs}


def _feature_dtype(dtype_name):
  dtype = tf.as_dtype(dtype_name)
  if dtype.is_floating:
    return tf.float32
  if dtype.is_integer or dtype.is_bool:
    return tf.int64
  if dtype == tf.string:
    return tf.string
  raise validation.invalid("model", "inputs of float, integer, bool or "
                           "string dtype", f"dtype {dtype_name}")


def _feature(values, dtype):
  values = np.asarray(values).ravel()
  if dtype == tf.float32:
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))
  if dtype == tf.int64:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[
      v if isinstance(v, bytes) else str(v).encode() for v in values]))


def _named_arrays(x, specs):
  """{feature name: array} of an array / list / dict `x` matching specs."""
  names = [n for n, _, _ in specs["inputs"]]
  if isinstance(x, dict):
    if set(x) != set(names):
      raise validation.invalid("x", f"a dict with the keys {names}",
                               f"keys {sorted(x)}")
    return {n: np.asarray(x[n]) for n in names}
  if isinstance(x, (list, tuple)):
    if len(x) != len(names):
      raise validation.invalid("x", f"{len(names)} arrays ({names})",
                               f"{len(x)} arrays")
    return {n: np.asarray(v) for n, v in zip(names, x)}
  if len(names) != 1:
    raise validation.invalid("x", f"a dict or list of {len(names)} arrays "
                             f"({names})", "a single array")
  return {names[0]: np.asarray(x)}


def _check_keys(keys, n):
  if keys is None:
    return np.arange(n, dtype=np.int64)
  keys = np.asarray(keys)
  if keys.shape != (n,) or not np.issubdtype(keys.dtype, np.integer):
    raise validation.invalid("keys", f"an integer array of shape ({n},)",
                             f"array of dtype {keys.dtype} and shape "
                             f"{keys.shape}")
  keys = keys.astype(np.int64)
  if np.unique(keys).size != n:
    raise validation.invalid("keys", "unique example keys",
                             f"{n - np.unique(keys).size} repeated keys")
  return keys


def write_examples(path_prefix, x, input_specs, keys=None, num_shards=1,
                   key_feature=KEY_FEATURE):
  """Writes arrays as keyed `tf.train.Example` TFRecord files (an adapter).

  Use it to feed the output of any task loader to the Beam pipelines.

  Args:
    path_prefix: output prefix; files are `<prefix>-SSSSS-of-NNNNN.tfrecord`.
    x: an array (single-input models), a list or a dict of arrays, N rows.
    input_specs: from `model_input_specs` or `signature_input_specs`.
    keys: optional (N,) unique int64 keys (default: row index 0..N-1).
    num_shards: number of files; row i goes to file i % num_shards.
    key_feature: name of the key feature.

  Returns:
    The list of written file paths.

  Raises:
    ValueError: `x` does not match `input_specs`, or bad `keys`.
  """
  arrays = _named_arrays(x, input_specs)
  rows = {v.shape[0] if v.ndim else None for v in arrays.values()}
  if len(rows) != 1 or None in rows:
    raise validation.invalid("x", "arrays with one common number of rows",
                             f"row counts {sorted(map(str, rows))}")
  n = rows.pop()
  keys = _check_keys(keys, n)
  num_shards = validation.check_int(num_shards, "num_shards", 1)
  dtypes = {name: _feature_dtype(d) for name, d, _ in input_specs["inputs"]}
  paths = [f"{path_prefix}-{s:05d}-of-{num_shards:05d}.tfrecord"
           for s in range(num_shards)]
  parent = os.path.dirname(path_prefix)
  if parent:
    tf.io.gfile.makedirs(parent)
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  try:
    for i in range(n):
      feature = {name: _feature(arrays[name][i], dtypes[name])
                 for name in arrays}
      feature[key_feature] = _feature([keys[i]], tf.int64)
      writers[i % num_shards].write(serialize_example(feature))
  finally:
    for w in writers:
      w.close()
  return paths


def parse_examples(serialized, input_specs, key_feature=KEY_FEATURE,
                   require_key=True):
  """Parses serialized `tf.train.Example`s into (keys, model inputs).

  Args:
    serialized: list of bytes, one serialized Example each.
    input_specs: from `model_input_specs` or `signature_input_specs`.
    key_feature: name of the int64 key feature.
    require_key: when False, a missing key feature is not an error and keys
      are None.

  Returns:
    (keys, x): keys (B,) int64 (or None); x in the structure of the specs'
    kind: an array, a list or a dict of (B, ...) arrays in the model's
    dtypes.

  Raises:
    ValueError: a record lacks a feature or has the wrong length.
  """
  spec = {}
  for name, dtype, shape in input_specs["inputs"]:
    spec[name] = tf.io.FixedLenFeature(shape, _feature_dtype(dtype))
  if require_key:
    spec[key_feature] = tf.io.FixedLenFeature([], tf.int64)
  try:
    parsed = tf.io.parse_example(tf.constant(serialized, tf.string), spec)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(
        f"Cannot parse input examples with features {sorted(spec)} "
        f"(names, dtypes and lengths must match the model's inputs): "
        f"{e.message}") from e
  named = {}
  for name, dtype, _ in input_specs["inputs"]:
    named[name] = parsed[name].numpy().astype(
        tf.as_dtype(dtype).as_numpy_dtype)
  keys = parsed[key_feature].numpy() if require_key else None
  return keys, structure_inputs(named, input_specs)


def structure_inputs(named, input_specs):
  """{feature name: array} -> the model's input structure (specs' kind)."""
  names = [n for n, _, _ in input_specs["inputs"]]
  if input_specs["kind"] == "dict":
    return {n: named[n] for n in names}
  if input_specs["kind"] == "list":
    return [named[n] for n in names]
  return named[names[0]]


# ---------------------------------------------------------------------------
# Shard files: encoding, atomic writes, digests.


def _target_array(targets, target_shape):
  targets = np.asarray(targets, np.float32)
  return targets.reshape((targets.shape[0],) + tuple(target_shape))


def serialize_example(feature):
  """Bytes of a `tf.train.Example` of `feature`, the same in every process.

  The features are a protobuf map, whose default serialization order can
  change from process to process; deterministic serialization sorts it, so
  equal examples give equal bytes on every runner and `PYTHONHASHSEED`.

  Args:
    feature: dict {name: `tf.train.Feature`}.

  Returns:
    The serialized Example.
  """
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString(deterministic=True)


def encode_shard(keys, values, fmt, value_feature=TARGET_FEATURE):
  """Serializes one shard (keys sorted by the caller) into file bytes.

  Args:
    keys: (n,) int64.
    values: dict {feature name: (n, ...) float32 array}, or one array for
      `value_feature`.
    fmt: "tfrecord", "parquet" or "jsonl".
    value_feature: feature name when `values` is an array.

  Returns:
    bytes of the whole file: a pure function of the arguments (the same
    bytes in every process).
  """
  if not isinstance(values, dict):
    values = {value_feature: values}
  keys = np.asarray(keys, np.int64)
  values = {k: np.asarray(v, np.float32) for k, v in values.items()}
  if fmt == TFRECORD:
    # tf.io.TFRecordWriter only writes to paths: go through a local file.
    fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
    os.close(fd)
    try:
      with tf.io.TFRecordWriter(tmp) as writer:
        for i, key in enumerate(keys):
          feature = {KEY_FEATURE: _feature([key], tf.int64)}
          for name, v in values.items():
            feature[name] = _feature(v[i], tf.float32)
          writer.write(serialize_example(feature))
      with open(tmp, "rb") as f:
        return f.read()
    finally:
      os.remove(tmp)
  if fmt == PARQUET:
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = {KEY_FEATURE: pa.array(keys, pa.int64())}
    for name, v in values.items():
      if v.ndim == 1:
        columns[name] = pa.array(v, pa.float32())
      else:
        width = int(np.prod(v.shape[1:]))
        columns[name] = pa.FixedSizeListArray.from_arrays(
            pa.array(v.reshape(-1), pa.float32()), width)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()
  if fmt == JSONL:
    lines = []
    for i, key in enumerate(keys):
      row = {KEY_FEATURE: int(key)}
      row.update({name: v[i].tolist() for name, v in values.items()})
      lines.append(json.dumps(row, sort_keys=True))
    return ("\n".join(lines) + ("\n" if lines else "")).encode()
  raise validation.invalid("output_format", f"one of {SCORE_FORMATS}", fmt)


def decode_shard(data, fmt, value_shapes):
  """Parses shard bytes written by `encode_shard`.

  Args:
    data: the file's bytes.
    fmt: "tfrecord", "parquet" or "jsonl".
    value_shapes: {feature name: per-example shape} of the value features.

  Returns:
    (keys (n,) int64, {name: (n, *shape) float32}) in file order.

  Raises:
    ValueError: the bytes are not a valid shard of that format.
  """
  try:
    if fmt == TFRECORD:
      fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      try:
        # Whole batches of records: iterating record by record in Python
        # costs more than parsing them.
        batches = list(tf.data.TFRecordDataset(tmp).batch(_READ_BATCH))
      finally:
        os.remove(tmp)
      records = (tf.concat(batches, 0) if batches
                 else tf.zeros((0,), tf.string))
      if not records.shape[0]:
        return np.zeros((0,), np.int64), {
            k: np.zeros((0,) + tuple(s), np.float32)
            for k, s in value_shapes.items()}
      spec = {KEY_FEATURE: tf.io.FixedLenFeature([], tf.int64)}
      for name, shape in value_shapes.items():
        spec[name] = tf.io.FixedLenFeature(list(shape), tf.float32)
      parsed = tf.io.parse_example(records, spec)
      return parsed[KEY_FEATURE].numpy(), {
          k: parsed[k].numpy() for k in value_shapes}
    if fmt == PARQUET:
      import pyarrow.parquet as pq
      table = pq.read_table(io.BytesIO(data))
      keys = table.column(KEY_FEATURE).to_numpy().astype(np.int64)
      values = {}
      for name, shape in value_shapes.items():
        column = table.column(name).combine_chunks()
        if shape:
          flat = column.flatten().to_numpy(zero_copy_only=False)
          values[name] = flat.astype(np.float32).reshape(
              (len(keys),) + tuple(shape))
        else:
          values[name] = column.to_numpy(zero_copy_only=False).astype(
              np.float32)
      return keys, values
    if fmt == JSONL:
      rows = [json.loads(line) for line in data.decode().splitlines()
              if line.strip()]
      keys = np.array([r[KEY_FEATURE] for r in rows], np.int64)
      return keys, {name: np.array([r[name] for r in rows], np.float32)
                    .reshape((len(rows),) + tuple(shape))
                    for name, shape in value_shapes.items()}
  except (tf.errors.OpError, KeyError, OSError, ValueError) as e:
    raise ValueError(f"Not a valid {fmt} shard: {e}") from e
  raise validation.invalid("fmt", f"one of {SCORE_FORMATS}", fmt)


def sha256(data):
  return hashlib.sha256(data).hexdigest()


def _width(array):
  """Values per example of a (n, ...) array (1 for (n,))."""
  return int(np.prod(array.shape[1:], dtype=np.int64))


def merge_duplicates(keys, values, rtol=1e-4, atol=1e-6):
  """Sorts by key and drops duplicate keys whose values agree.

  A runner may deliver an example twice (a retried bundle, or the same
  example in two input files); its targets are then equal up to float
  rounding and one copy is kept: the lexicographically smallest, so the
  result does not depend on arrival order.

  Args:
    keys: (n,) int64.
    values: (n, ...) float32, or a dict {name: (n, ...) float32} (several
      results per example: compared and kept together, as their columns
      side by side in the dict's order).
    rtol, atol: tolerance of "agree".

  Returns:
    (keys, values, num_dropped), keys strictly increasing; `values` in the
    structure given.

  Raises:
    ValueError: a key occurs with values that disagree (two different
      examples share a key).
  """
  if isinstance(values, dict):
    n = len(keys)
    arrays = {name: np.asarray(v, np.float32) for name, v in values.items()}
    # Widths spelled out: reshape(0, -1) cannot infer one (an empty shard).
    parts = [v.reshape(n, _width(v)) for v in arrays.values()]
    flat = np.concatenate(parts or [np.zeros((n, 0), np.float32)], axis=1)
    keys, flat, dropped = merge_duplicates(keys, flat, rtol, atol)
    out, start = {}, 0
    for name, v in arrays.items():
      width = _width(v)
      out[name] = flat[:, start:start + width].reshape(
          (len(keys),) + v.shape[1:])
      start += width
    return keys, out, dropped
  keys = np.asarray(keys, np.int64)
  values = np.asarray(values, np.float32)
  flat = values.reshape(len(keys), _width(values))
  # Sort by key, then by value (lexicographic), for a deterministic pick.
  order = np.lexsort(tuple(flat[:, j] for j in range(flat.shape[1] - 1, -1,
                                                      -1)) + (keys,))
  keys, values, flat = keys[order], values[order], flat[order]
  first = np.ones(len(keys), bool)
  first[1:] = keys[1:] != keys[:-1]
  if first.all():
    return keys, values, 0
  group = np.cumsum(first) - 1
  kept = flat[first][group]
  bad = ~np.all(np.isclose(flat, kept, rtol=rtol, atol=atol), axis=1)
  if bad.any():
    raise ValueError(
        f"Example keys {sorted(set(keys[bad].tolist()))[:10]} occur with "
        f"different targets: two different examples share a key. Keys must "
        f"be unique per example.")
  return keys[first], values[first], int((~first).sum())


# ---------------------------------------------------------------------------
# Settings and manifest.


def _join(path, name):
  return posixpath.join(path, name) if "://" in path else os.path.join(
      path, name)


def _read_bytes(path):
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def read_json(path):
  """Parsed JSON of `path`, or None when it does not exist."""
  if not tf.io.gfile.exists(path):
    return None
  return json.loads(_read_bytes(path).decode())


def read_targets(path, keys=None):
  """Reads a targets directory written by the Beam targets pipeline.

  Checks, in order: the manifest exists (the pipeline finished); each shard
  file exists and has the manifest's sha256 (nothing truncated or replaced);
  every key lives in the shard `shard_of` assigns it (no stray records);
  no key occurs twice; the number of keys is the manifest's.

  Args:
    path: the pipeline's `--output` directory.
    keys: optional int64 keys: return the targets of exactly these keys, in
      this order (e.g. the keys of the arrays you fit the head on).

  Returns:
    (keys, targets): keys (N,) int64 ascending (or as given); targets
    float32 (N,) or (N, k) as `mc_dropout_targets` returns them for the
    same statistic, or for a model of several outputs a dict of such
    arrays keyed by output name, in the model's output order (as
    `mc_dropout_targets` returns it). With default keys (row indices) the
    result is in row order, ready for `fit_variation_head(dual, x,
    targets)`.

  Raises:
    ValueError: the output is incomplete (no manifest), a shard is missing
      or altered, keys are duplicated or missing, or `keys` asks for keys
      that are not there.
  """
  path = os.fspath(path)
  manifest = read_json(_join(path, MANIFEST_FILENAME))
  if manifest is None:
    raise ValueError(
        f"No {MANIFEST_FILENAME} in {path!r}: the targets pipeline did not "
        f"finish. Rerun it with the same arguments (finished shards are "
        f"reused).")
  fmt = manifest["output_format"]
  num_shards = manifest["num_shards"]
  output_names = manifest.get("output_names")
  features = target_features(manifest["target_shape"], output_names)
  all_keys, all_values = [], {name: [] for name in features}
  for entry in manifest["shards"]:
    file_path = _join(path, entry["file"])
    if not tf.io.gfile.exists(file_path):
      raise ValueError(f"Shard {entry['file']!r} listed in the manifest is "
                       f"missing from {path!r}: rerun the pipeline.")
    data = _read_bytes(file_path)
    if sha256(data) != entry["sha256"]:
      raise ValueError(f"Shard {entry['file']!r} in {path!r} does not match "
                       f"its manifest digest (altered or truncated): rerun "
                       f"the pipeline.")
    shard_keys, values = decode_shard(data, fmt, features)
    wrong = shard_of(shard_keys, num_shards) != entry["index"]
    if wrong.any():
      raise ValueError(
          f"Shard {entry['file']!r} holds keys of other shards "
          f"({shard_keys[wrong][:10].tolist()}): duplicated records.")
    if len(shard_keys) != entry["count"]:
      raise ValueError(f"Shard {entry['file']!r} has {len(shard_keys)} "
                       f"records, its manifest says {entry['count']}.")
    all_keys.append(shard_keys)
    for name in features:
      all_values[name].append(values[name])
  out_keys = (np.concatenate(all_keys) if all_keys
              else np.zeros((0,), np.int64))
  order = np.argsort(out_keys, kind="stable")
  out_keys = out_keys[order]
  columns = {name: (np.concatenate(all_values[name]) if all_values[name]
                    else np.zeros((0,) + shape, np.float32))[order]
             for name, shape in features.items()}
  repeated = out_keys[1:][out_keys[1:] == out_keys[:-1]]
  if repeated.size:
    raise ValueError(f"Duplicate example keys in {path!r}: "
                     f"{np.unique(repeated)[:10].tolist()}.")
  if len(out_keys) != manifest["num_keys"]:
    raise ValueError(f"{path!r} holds {len(out_keys)} keys, its manifest "
                     f"says {manifest['num_keys']}: keys are missing.")
  if keys is not None:
    wanted = np.asarray(keys, np.int64)
    pos = np.searchsorted(out_keys, wanted)
    pos = np.minimum(pos, max(len(out_keys) - 1, 0))
    found = (out_keys[pos] == wanted) if len(out_keys) else np.zeros(
        wanted.shape, bool)
    if not found.all():
      missing = wanted[~found]
      raise ValueError(f"{missing.size} requested keys are missing from "
                       f"{path!r}, e.g. {missing[:10].tolist()}.")
    out_keys = wanted
    columns = {name: column[pos] for name, column in columns.items()}
  if output_names is None:
    return out_keys, columns[TARGET_FEATURE]
  return out_keys, {name: columns[target_feature(name)]
                    for name in output_names}


def read_scores(path):
  """Reads a scoring pipeline output directory into arrays ordered by key.

  The format and the per-example shapes come from the run's own
  `scoring.json`.

  Args:
    path: the scoring pipeline's `--output` directory.

  Returns:
    dict {"key": (N,) int64 ascending, "prediction": (N, ...) float32,
    "variation": (N, ...) float32}, and "out_of_range" (N,) float32 when
    the scored signature returns it (`score_names`). For a dual of several
    outputs the dict is keyed the same way, by the signature's output
    keys: "prediction/<output name>" and "variation/<output name>" per
    output (`contract.output_keys` order) in place of "prediction" and
    "variation"; `contract.per_output(scores, "variation")` gives {output
    name: array}.

  Raises:
    ValueError: `path` has no `scoring.json` (not a finished scoring
      output), a score file is missing, or a key occurs twice.
  """
  path = os.fspath(path)
  info = read_json(_join(path, SCORING_FILENAME))
  if info is None:
    raise ValueError(f"No {SCORING_FILENAME} in {path!r}: not a finished "
                     f"scoring pipeline output.")
  fmt = check_format(info["output_format"], SCORE_FORMATS, "output_format")
  files = [_join(path, shard_filename(i, info["num_shards"], fmt,
                                      prefix=SCORES_PREFIX))
           for i in range(info["num_shards"])]
  for f in files:
    if not tf.io.gfile.exists(f):
      raise ValueError(f"Score file {f!r} is missing: rerun the scoring "
                       f"pipeline.")
  shapes = {name: tuple(info["output_shapes"][name])
            for name in score_names(info["output_shapes"])}
  keys, values = [], {k: [] for k in shapes}
  for f in files:
    k, v = decode_shard(_read_bytes(f), fmt, shapes)
    keys.append(k)
    for name in shapes:
      values[name].append(v[name])
  keys = np.concatenate(keys)
  order = np.argsort(keys, kind="stable")
  keys = keys[order]
  if np.any(keys[1:] == keys[:-1]):
    raise ValueError(f"Duplicate keys in {path!r}.")
  out = {KEY_FEATURE: keys}
  for name in shapes:
    out[name] = np.concatenate(values[name])[order]
  return out
