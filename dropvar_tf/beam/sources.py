"""Input examples of the Beam pipelines: matching, reading, decoding them.

Examples are TFRecord files of keyed `tf.train.Example`s (see
`records.write_examples`) or `.npz` files of arrays named after the model's
inputs, plus an optional int64 key array. Both pipelines read them with
`read_examples` into raw elements (serialized Examples, or `(key, row)` pairs
for `.npz`) and decode batches of them with `decode_batch`; the scoring
pipeline feeds `RunInference` with `keyed_examples`, one `(key, {input name:
array})` pair per example.
"""

import struct
import zipfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import google_crc32c
import numpy as np

from dropvar_tf import validation
from dropvar_tf.beam import records
from dropvar_tf.beam.formats import INPUT_FORMATS
# Rows of an .npz file read per work item (spread over workers).
NPZ_RANGE_ROWS = 4096


def _is_glob(pattern):
  return any(c in pattern for c in "*?[")


def match_inputs(patterns):
  """[(path, size)] of every file matching `patterns`, sorted by path.

  A pattern without wildcards is one file, looked up directly: Beam's
  `match` builds and compiles a regular expression per pattern, which costs
  more than the lookup when the inputs are a long list of files.

  Raises:
    FileNotFoundError: a pattern matches nothing.
  """
  files = []
  globs = [p for p in patterns if _is_glob(p)]
  for pattern, result in zip(globs, FileSystems.match(globs)):
    if not result.metadata_list:
      raise FileNotFoundError(f"No input file matches {pattern!r}.")
    files += [(m.path, m.size_in_bytes) for m in result.metadata_list]
  for path in patterns:
    if _is_glob(path):
      continue
    if not FileSystems.exists(path):
      raise FileNotFoundError(f"No input file matches {path!r}.")
    meta = FileSystems.get_filesystem(path).metadata(path)
    files.append((meta.path, meta.size_in_bytes))
  return sorted(set(files))


def resolve_input_format(input_format, files):
  """"tfrecord" or "npz": `input_format`, or by extension when "auto".

  Raises:
    ValueError: `input_format` is not one of `INPUT_FORMATS`, or "auto"
      with files of both formats.
  """
  if input_format not in INPUT_FORMATS:
    raise validation.invalid("input_format", f"one of {INPUT_FORMATS}",
                             input_format)
  if input_format != "auto":
    return input_format
  kinds = {"npz" if p.endswith(".npz") else "tfrecord" for p, _ in files}
  if len(kinds) != 1:
    raise validation.invalid("input", "files of one format (.npz or "
                             "TFRecord)", [p for p, _ in files][:4])
  return kinds.pop()


def _npz_header(path, name):
  """Shape of array `name` of an .npz file, read from its header only."""
  return _npz_shape_and_dtype(path, name)[0]


def _npz_shape_and_dtype(path, name):
  """(shape, dtype) of array `name` of an .npz file, from its header only."""
  with FileSystems.open(path) as f, zipfile.ZipFile(f) as z:
    with z.open(f"{name}.npy") as member:
      version = np.lib.format.read_magic(member)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
      else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
  return shape, dtype


def _check_key_dtype(path, key_feature, dtype):
  """Keys are int64 (as TFRecord keys are): refuse floats and uint64.

  A float key would be truncated to an integer (two examples could share
  one) and a uint64 key of 2**63 or more would not fit.
  """
  if not (dtype.kind == "i" or (dtype.kind == "u" and dtype.itemsize < 8)):
    raise validation.invalid(
        "input", f"an integer {key_feature!r} array (keys are int64)",
        f"{path!r} with {key_feature!r} of dtype {dtype}")


def _npz_names(path):
  with FileSystems.open(path) as f, zipfile.ZipFile(f) as z:
    return [n[:-len(".npy")] for n in z.namelist() if n.endswith(".npy")]


def npz_ranges(files, input_specs, key_feature, range_rows=NPZ_RANGE_ROWS):
  """Work items (path, start, stop, has_keys) covering every .npz row.

  Raises:
    ValueError: a file lacks an input array, arrays disagree on rows, or
      several files have no key array (row indices would repeat).
  """
  items = []
  needed = [n for n, _, _ in input_specs["inputs"]]
  keyless = []
  for path, _ in files:
    names = _npz_names(path)
    missing = [n for n in needed if n not in names]
    if missing:
      raise validation.invalid(
          "input", f".npz files with the arrays {needed} (and optionally "
          f"{key_feature!r})", f"{path!r} without {missing}")
    has_keys = key_feature in names
    rows = {_npz_header(path, n)[0] for n in needed}
    if has_keys:
      key_shape, key_dtype = _npz_shape_and_dtype(path, key_feature)
      _check_key_dtype(path, key_feature, key_dtype)
      rows.add(key_shape[0])
    else:
      keyless.append(path)
    if len(rows) != 1:
      raise validation.invalid("input", "arrays with one number of rows",
                               f"{path!r} with row counts {sorted(rows)}")
    n = rows.pop()
    items += [(path, s, min(s + range_rows, n), has_keys)
              for s in range(0, n, range_rows)]
  if keyless and len(files) > 1:
    raise validation.invalid(
        "input", f"a {key_feature!r} array in every .npz file when there are "
        f"several (row indices would repeat)", keyless[:4])
  return items


class ReadNpzRowsFn(beam.DoFn):
  """(path, start, stop, has_keys) -> (key, {input name: row}) per row."""

  def __init__(self, input_names, key_feature):
    self._names = list(input_names)
    self._key_feature = key_feature
    self._cache = None

  def setup(self):
    self._cache = {}

  def _arrays(self, path):
    if path not in self._cache:
      # One file at a time per worker: the ranges of a file are usually
      # processed together.
      self._cache.clear()
      with FileSystems.open(path) as f:
        with np.load(f, allow_pickle=False) as data:
          self._cache[path] = {n: data[n] for n in data.files}
    return self._cache[path]

  def process(self, item):
    path, start, stop, has_keys = item
    arrays = self._arrays(path)
    for i in range(start, stop):
      key = int(arrays[self._key_feature][i]) if has_keys else i
      yield key, {n: arrays[n][i] for n in self._names}


def _masked_crc32c(data):
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(f, path):
  """The records of an open TFRecord file, checked against their CRCs.

  Each record is framed as TensorFlow writes it: length (uint64 LE), masked
  crc32c of the length, data, masked crc32c of the data.

  Args:
    f: a binary file object (decompressed).
    path: its path, for error messages.

  Yields:
    Each record's bytes, in file order.

  Raises:
    ValueError: the file is truncated or a checksum does not match.
  """
  while True:
    header = f.read(12)
    if not header:
      return
    if len(header) < 12:
      raise ValueError(f"Not a valid TFRecord file: {path!r} ends inside "
                       f"a record header.")
    length, length_crc = struct.unpack("<QI", header)
    if _masked_crc32c(header[:8]) != length_crc:
      raise ValueError(f"Not a valid TFRecord file: {path!r} has a record "
                       f"length that does not match its checksum.")
    data = f.read(length + 4)
    if len(data) < length + 4:
      raise ValueError(f"Not a valid TFRecord file: {path!r} ends inside "
                       f"a record.")
    if _masked_crc32c(data[:length]) != struct.unpack("<I", data[length:])[0]:
      raise ValueError(f"Not a valid TFRecord file: {path!r} has a record "
                       f"that does not match its checksum.")
    yield data[:length]


class ReadTFRecordFileFn(beam.DoFn):
  """TFRecord file path -> its serialized records (any Beam file system).

  Compression (`.gz`, ...) is detected from the extension, as Beam's
  TFRecord source does. A file is read by one worker, as there: TFRecord
  files cannot be split (records have no sync markers).
  """

  def process(self, path):
    with FileSystems.open(path) as f:
      yield from read_tfrecords(f, path)


def decode_batch(batch, input_format, input_specs, key_feature):
  """A batch of raw elements -> (keys (B,) int64, model inputs).

  Args:
    batch: serialized Examples ("tfrecord") or (key, row) pairs ("npz").
    input_format: "tfrecord" or "npz".
    input_specs: from `records.model_input_specs` or
      `records.signature_input_specs`.
    key_feature: name of the int64 key feature.

  Returns:
    (keys, x), x in the structure of the specs' kind (an array, a list or a
    dict of (B, ...) arrays in the model's dtypes).

  Raises:
    ValueError: an Example lacks a feature or has the wrong length.
  """
  if input_format == "tfrecord":
    return records.parse_examples(list(batch), input_specs, key_feature)
  keys = np.array([k for k, _ in batch], np.int64)
  named = {}
  for name, dtype, _ in input_specs["inputs"]:
    named[name] = np.stack([row[name] for _, row in batch]).astype(
        np.dtype(dtype))
  return keys, records.structure_inputs(named, input_specs)


def read_examples(pipeline, files, input_format, input_specs, key_feature,
                  label="Read"):
  """PCollection of raw examples: serialized Examples or (key, row) pairs.

  One read step for any number of files: the paths the launcher matched are
  one PCollection, spread over the workers and read whole
  (`ReadTFRecordFileFn`), or `.npz` row ranges, so the pipeline graph does not
  grow with the number of files. Nothing is done per file but opening it:
  Beam's `ReadAllFromTFRecord` matched every path again and split each into
  ranges that a TFRecord file cannot use, which cost more than the records
  of a small file.
  """
  if input_format == "tfrecord":
    return (pipeline
            | f"{label}Files" >> beam.Create([path for path, _ in files])
            | f"{label}Spread" >> beam.Reshuffle()
            | f"{label}Records" >> beam.ParDo(ReadTFRecordFileFn()))
  items = npz_ranges(files, input_specs, key_feature)
  names = [n for n, _, _ in input_specs["inputs"]]
  return (pipeline
          | f"{label}Ranges" >> beam.Create(items)
          | f"{label}Spread" >> beam.Reshuffle()
          | f"{label}Rows" >> beam.ParDo(ReadNpzRowsFn(names, key_feature)))


class KeyedExamplesFn(beam.DoFn):
  """Batch of raw elements -> (key, {input name: array}) per example."""

  def __init__(self, input_format, input_specs, key_feature):
    self._input_format = input_format
    # Decoded by name whatever the model's input structure.
    self._input_specs = dict(input_specs, kind="dict")
    self._key_feature = key_feature

  def process(self, batch):
    keys, named = decode_batch(batch, self._input_format, self._input_specs,
                               self._key_feature)
    for i, key in enumerate(keys):
      yield int(key), {name: values[i] for name, values in named.items()}


def keyed_examples(pipeline, files, input_format, input_specs, key_feature,
                   batch_size, label="Read"):
  """PCollection of (key, {input name: array}), one per input example.

  Raw elements are decoded in batches of at most `batch_size` (one
  `tf.io.parse_example` call per batch for TFRecord input); the arrays have
  the dtypes and per-example shapes of `input_specs`.
  """
  raw = read_examples(pipeline, files, input_format, input_specs,
                      key_feature, label)
  return (raw
          | f"{label}Batch" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=batch_size)
          | f"{label}Decode" >> beam.ParDo(KeyedExamplesFn(
              input_format, input_specs, key_feature)))
