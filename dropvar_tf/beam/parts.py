"""Part files: each computed batch, saved at once, so a rerun skips it.

Both pipelines save the results of every batch they compute as one part
file under `<output>/parts/`, written atomically as soon as the batch is
done. A rerun after a kill reads them back (`ReadPartFn`), skips their keys
and computes only the rest; the output files are then written from all
parts. A part's name is a digest of its keys and its bytes a pure function
of its keys and results, so a retried or repeated batch rewrites the same
file: harmless.

A part holds the keys, then each result array, as consecutive `.npy`
records (internal to a run, never the output: the fastest format to write
and read back, and deterministic: equal arrays, equal bytes).
"""

import io
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np

from dropvar_tf import validation
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import records

PARTS_DIR = "parts"
PART_PREFIX = "part"
PART_EXTENSION = "npys"


def part_name(keys):
  """File name of the part holding `keys` (sorted): named by its keys."""
  digest = records.sha256(np.asarray(keys, "<i8").tobytes())[:24]
  return f"{PART_PREFIX}-{digest}.{PART_EXTENSION}"


def encode_part(keys, values):
  """Part file bytes of (keys, results).

  Args:
    keys: (n,) int64, sorted.
    values: one (n, ...) float32 array (targets), or a dict {name: (n, ...)
      array} (scores), written in the dict's order.

  Returns:
    The bytes: keys, then each array, as `.npy` records.
  """
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(keys, "<i8"), allow_pickle=False)
  arrays = values.values() if isinstance(values, dict) else [values]
  for array in arrays:
    np.save(buffer, np.asarray(array, "<f4"), allow_pickle=False)
  return buffer.getvalue()


def decode_part(data, names=None):
  """(keys int64, results) of part file bytes (`encode_part`).

  Args:
    data: the file's bytes.
    names: None for one array (targets), or the dict's names in order.

  Returns:
    (keys, float32 array) or (keys, {name: float32 array}).
  """
  buffer = io.BytesIO(data)
  keys = np.load(buffer, allow_pickle=False).astype(np.int64)
  if names is None:
    return keys, np.load(buffer, allow_pickle=False).astype(np.float32)
  return keys, {name: np.load(buffer, allow_pickle=False).astype(np.float32)
                for name in names}


def write_part(output_dir, keys, values):
  """Writes one computed batch's (keys, results) atomically to `parts/`."""
  path = FileSystems.join(output_dir, PARTS_DIR, part_name(keys))
  filesystems.atomic_write(path, encode_part(keys, values))


def check_settings(output_dir, settings, resume, written="written"):
  """Refuses to resume a directory that holds results of other settings.

  Reads only.

  Args:
    output_dir: the output directory.
    settings: this run's settings, as its `settings.json` holds them.
    resume: whether this run reuses earlier results.
    written: how the error says the directory was made ("written",
      "scored").

  Raises:
    ValueError: `resume` is True and the directory's `settings.json`
      differs from `settings`.
  """
  path = FileSystems.join(output_dir, records.SETTINGS_FILENAME)
  if not resume or not FileSystems.exists(path):
    return
  stored = json.loads(filesystems.read_file_bytes(path).decode())
  for name, value in settings.items():
    if stored.get(name) != value:
      raise validation.invalid(
          "output", f"a directory {written} with the same settings, or "
          f"resume=False; its `{name}` is {stored.get(name)!r}, this "
          f"run's is {value!r}", output_dir)


def existing_parts(output_dir):
  """Paths of the part files in `output_dir` (complete by design)."""
  pattern = FileSystems.join(output_dir, PARTS_DIR,
                             f"{PART_PREFIX}-*.{PART_EXTENSION}")
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def make_parts_dir(output_dir):
  """Creates `<output_dir>/parts/` when missing."""
  path = FileSystems.join(output_dir, PARTS_DIR)
  if not FileSystems.exists(path):
    FileSystems.mkdirs(path)


class ReadPartFn(beam.DoFn):
  """Part file path -> its (keys, results) (`decode_part`)."""

  def __init__(self, names=None):
    self._names = None if names is None else list(names)

  def process(self, path):
    yield decode_part(filesystems.read_file_bytes(path), self._names)


class ConcatKeysFn(beam.CombineFn):
  """Key arrays -> one sorted array of unique int64 keys (maybe empty)."""

  def create_accumulator(self):
    return []

  def add_input(self, accumulator, keys):
    accumulator.append(np.asarray(keys, np.int64))
    return accumulator

  def merge_accumulators(self, accumulators):
    return [k for acc in accumulators for k in acc]

  def extract_output(self, accumulator):
    if not accumulator:
      return np.zeros((0,), np.int64)
    return np.unique(np.concatenate(accumulator))


def done_parts(pipeline, paths, names=None, label="Parts"):
  """(parts, done keys): an earlier run's parts and their sorted keys.

  Args:
    pipeline: the Beam pipeline.
    paths: the part files (`existing_parts`; may be empty).
    names: as in `decode_part`.
    label: prefix of the step names.

  Returns:
    A PCollection of (keys, results) per part, and a one-element
    PCollection of all their keys, sorted (empty without parts), for a side
    input.
  """
  parts = (pipeline
           | f"{label}Paths" >> beam.Create(list(paths))
           | f"{label}Read" >> beam.ParDo(ReadPartFn(names)))
  keys = (parts
          | f"{label}Keys" >> beam.Map(lambda part: part[0])
          | f"{label}DoneKeys" >> beam.CombineGlobally(ConcatKeysFn()))
  return parts, keys
