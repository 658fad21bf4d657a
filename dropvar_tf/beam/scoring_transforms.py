"""The scoring pipeline's transforms, files and run (Beam and TensorFlow).

`scoring_pipeline` is the entry point (its docstring describes the
pipeline); it imports this module only when a run starts, so that its
command line parses flags before TensorFlow and Beam load.
"""

import json
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
import numpy as np

from dropvar_tf import contract
from dropvar_tf import validation
from dropvar_tf.beam import batches
from dropvar_tf.beam import counters
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import formats
from dropvar_tf.beam import model_handler
from dropvar_tf.beam import options
from dropvar_tf.beam import parts
from dropvar_tf.beam import progress
from dropvar_tf.beam import records
from dropvar_tf.beam import sources

# Files of a SavedModel whose bytes make its fingerprint: the graph and the
# variables' index (which holds a checksum of every variable).
_FINGERPRINT_FILES = ("saved_model.pb", "variables/variables.index")


def _per_example_shape(spec):
  """Stored shape of one example's output: () when it has one value."""
  shape = [int(d) for d in spec.shape[1:]]
  return [] if int(np.prod(shape, dtype=np.int64)) == 1 else shape


def output_shapes(fn):
  """{output name: shape} stored per example, in file order.

  "prediction" and "variation", or for a dual of several outputs
  "prediction/<name>" and "variation/<name>" per output (sorted), then
  "out_of_range" when the signature returns it (`records.score_names`);
  other outputs are not stored.

  Raises:
    ValueError: the signature returns neither the contract's output keys
      nor a complete set of them per output (`records.score_output_names`).
  """
  outputs = fn.structured_outputs
  if records.score_output_names(outputs) is None:
    raise validation.invalid(
        "saved_model", f"a signature returning {list(contract.OUTPUT_KEYS)}, "
        f"or {contract.prediction_key('<name>')!r} and "
        f"{contract.variation_key('<name>')!r} for each of two or more "
        f"outputs", f"outputs {sorted(outputs)}")
  return {k: _per_example_shape(outputs[k])
          for k in records.score_names(outputs)}


def saved_model_fingerprint(saved_model_dir):
  """sha256 of a SavedModel's graph and variable index (any file system)."""
  data = b""
  for name in _FINGERPRINT_FILES:
    path = FileSystems.join(saved_model_dir, name)
    if FileSystems.exists(path):
      data += records.sha256(filesystems.read_file_bytes(path)).encode()
  return records.sha256(data)


class DecodeItemFn(beam.DoFn):
  """A work item -> one batch for `RunInference`, sorted by key.

  Each example becomes ((item id, item size, key), {input name: array}):
  the size tells `SavePartsFn` when the item's scores are all there.
  """

  def __init__(self, config):
    self._config = dict(config)

  def process(self, item):
    c = self._config
    batch_id, elements = item
    keys, named = sources.decode_batch(
        [raw for _, raw in elements], c["input_format"],
        dict(c["input_specs"], kind="dict"), c["key_feature"])
    n = len(keys)
    yield [((batch_id, n, int(key)), {name: values[i]
                                      for name, values in named.items()})
           for i, key in enumerate(keys)]


class SavePartsFn(beam.DoFn):
  """((item, size, key), PredictionResult) -> (keys, scores) per item.

  `RunInference` emits an item's scores together, in one bundle; once all
  `size` are there, they are saved as one part file (`parts.write_part`)
  and passed on. Scores still waiting at the end of a bundle (a runner that
  split an item's output) are saved as a smaller part: a part may hold any
  keys, so nothing is lost either way.
  """

  def __init__(self, output_dir, output_shapes):
    self._output_dir = output_dir
    self._shapes = dict(output_shapes)
    self._names = records.score_names(self._shapes)
    self._scored = counters.counter("examples_scored")
    self._pending = None

  def start_bundle(self):
    self._pending = {}

  def _save(self, rows):
    rows.sort(key=lambda row: row[0])
    keys = np.array([key for key, _ in rows], np.int64)
    values = {name: np.array([r[name] for _, r in rows], np.float32).reshape(
        (len(rows),) + tuple(self._shapes[name]))
              for name in self._names}
    parts.write_part(self._output_dir, keys, values)
    self._scored.inc(len(keys))
    progress.add("scored", len(keys))
    return keys, values

  def process(self, element):
    (batch_id, size, key), result = element
    rows = self._pending.setdefault(batch_id, [])
    rows.append((key, {name: result.inference[name]
                       for name in self._names}))
    if len(rows) == size:
      del self._pending[batch_id]
      yield self._save(rows)

  def finish_bundle(self):
    for batch_id in sorted(self._pending):
      yield WindowedValue(self._save(self._pending[batch_id]), 0,
                          [GlobalWindow()])
    self._pending = {}


def _by_shard(part, num_shards):
  keys, values = part
  shards = records.shard_of(keys, num_shards)
  for shard in np.unique(shards):
    sel = shards == shard
    yield int(shard), (keys[sel], {k: v[sel] for k, v in values.items()})


class WriteScoresFn(beam.DoFn):
  """(shard, [(keys, scores), ...]) -> one score file; yields its index.

  The file's bytes depend only on its rows (sorted; duplicates of a key,
  e.g. from a retried bundle, merged; deterministic encoding), so a retried
  write rewrites the same bytes, on any runner.
  """

  def __init__(self, output_dir, num_shards, output_format, names):
    self._output_dir = output_dir
    self._num_shards = num_shards
    self._format = output_format
    self._names = tuple(names)
    self._duplicates = counters.counter("duplicates_dropped")

  def process(self, item):
    shard, pieces = item
    pieces = list(pieces)
    keys = np.concatenate([k for k, _ in pieces])
    values = {name: np.concatenate([v[name] for _, v in pieces])
              for name in self._names}
    yield write_score_shard(self._output_dir, shard, self._num_shards,
                            self._format, keys, values, self._duplicates)


def write_score_shard(output_dir, index, num_shards, fmt, keys, values,
                      duplicates=None):
  """Writes one score file atomically (rows sorted by key); returns index.

  Args:
    output_dir: the output directory.
    index, num_shards: the shard, of how many.
    fmt: "parquet", "tfrecord" or "jsonl".
    keys: (n,) int64.
    values: {output name: (n, ...) float32}, in file order.
    duplicates: optional Beam counter of dropped duplicate rows.

  Returns:
    `index`.

  Raises:
    ValueError: one key with two different scores.
  """
  keys, out, dropped = records.merge_duplicates(keys, values)
  if duplicates is not None:
    duplicates.inc(dropped)
  name = records.shard_filename(index, num_shards, fmt,
                                prefix=records.SCORES_PREFIX)
  filesystems.atomic_write(FileSystems.join(output_dir, name),
                           records.encode_shard(keys, out, fmt))
  return int(index)


def finish_scores(written, output_dir, num_shards, fmt, shapes, info):
  """Writes the empty score files, then `scoring.json`, the last file."""
  for index in sorted(set(range(num_shards)) - set(written)):
    write_score_shard(output_dir, index, num_shards, fmt,
                      np.zeros((0,), np.int64),
                      {name: np.zeros((0,) + tuple(shapes[name]), np.float32)
                       for name in records.score_names(shapes)})
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.SCORING_FILENAME),
      json.dumps(info, indent=2, sort_keys=True).encode())
  return info


def write_scores(scores, output, output_format, shapes, num_shards, info):
  """Adds the score files (by key shard) and `scoring.json` under `output`.

  Args:
    scores: PCollection of (keys, {output name: array}) pieces.
    output, output_format, shapes, num_shards: where and how.
    info: the `scoring.json` content.

  Returns:
    The one-element PCollection of the written `scoring.json` content.
  """
  return (scores
          | "ByShard" >> beam.FlatMap(_by_shard, num_shards)
          | "GroupByShard" >> beam.GroupByKey()
          | "WriteShards" >> beam.ParDo(WriteScoresFn(
              output, num_shards, output_format,
              records.score_names(shapes)))
          | "CollectShards" >> beam.combiners.ToList()
          | "WriteScoringJson" >> beam.Map(
              finish_scores, output, num_shards, output_format, shapes,
              info))


def _check_beam_batch_size(beam_batch_size, batch_size):
  if beam_batch_size is None:
    return 8 * batch_size
  beam_batch_size = validation.check_int(beam_batch_size, "beam_batch_size",
                                         1)
  if beam_batch_size % batch_size:
    raise validation.invalid(
        "beam_batch_size", f"a multiple of batch_size ({batch_size}), so "
        f"that no signature call is padded but the last", beam_batch_size)
  return beam_batch_size


def prepare_scoring(saved_model_dir, inputs, output,
                    output_format=formats.PARQUET, input_format="auto",
                    key_feature=formats.KEY_FEATURE, batch_size=256,
                    signature=contract.SERVING_SIGNATURE, num_shards=8,
                    beam_batch_size=None, resume=True):
  """Validates on the launcher; changes nothing in `output` but creating it.

  Returns:
    (config, files, info): the worker config (with the part files of an
    earlier run to resume), the matched input files and the settings
    (`settings.json` now, `scoring.json` last).

  Raises:
    ValueError: an invalid argument, or `output` holds scores of other
      settings (and `resume` is True).
    FileNotFoundError: an input pattern matches nothing.
  """
  records.check_format(output_format, formats.SCORE_FORMATS)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  beam_batch_size = _check_beam_batch_size(beam_batch_size, batch_size)
  num_shards = validation.check_int(num_shards, "num_shards", 1)
  if isinstance(inputs, str):
    inputs = [inputs]
  files = sources.match_inputs(inputs)
  input_format = sources.resolve_input_format(input_format, files)
  _, fn = model_handler.load_signature(saved_model_dir, signature)
  shapes = output_shapes(fn)
  config = {
      "signature": signature,
      "input_format": input_format,
      "input_specs": records.signature_input_specs(fn),
      "key_feature": key_feature,
      "batch_size": batch_size,
      "beam_batch_size": beam_batch_size,
      "num_shards": num_shards,
      "output_shapes": shapes,
  }
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  info = {"format_version": records.FORMAT_VERSION,
          "saved_model": saved_model_dir,
          "saved_model_fingerprint": saved_model_fingerprint(saved_model_dir),
          "signature": signature, "batch_size": batch_size,
          "num_shards": num_shards, "output_format": output_format,
          "output_shapes": shapes, "key_feature": key_feature,
          "input_format": input_format,
          "input_files": [[p, s] for p, s in files]}
  names = records.score_output_names(shapes)
  if names:
    # Only for several outputs: a single output's settings stay as they were.
    info["output_names"] = names
  info = json.loads(json.dumps(info))
  parts.check_settings(output, info, resume, written="scored")
  config["parts"] = parts.existing_parts(output) if resume else []
  return config, files, info


def start_scoring_output(output_dir, info, resume):
  """Makes `output_dir` this run's: called when the pipeline starts.

  A launch that fails before leaves the directory as it was. A finished
  output resumed with the same settings stays readable: this run rewrites
  the same bytes and `scoring.json` last.

  Side effects: creates `parts/` and writes `settings.json`; with `resume`
  False, deletes the earlier score files, parts and `scoring.json` first.
  """
  if not resume:
    pattern = FileSystems.join(output_dir, f"{records.SCORES_PREFIX}-*")
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    paths += parts.existing_parts(output_dir)
    scoring = FileSystems.join(output_dir, records.SCORING_FILENAME)
    if FileSystems.exists(scoring):
      paths.append(scoring)
    if paths:
      FileSystems.delete(paths)
  parts.make_parts_dir(output_dir)
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.SETTINGS_FILENAME),
      json.dumps(info, indent=2, sort_keys=True).encode())


def build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                           config, files, info):
  """Adds the scoring transforms to `pipeline`."""
  examples = sources.read_examples(pipeline, files, config["input_format"],
                                   config["input_specs"],
                                   config["key_feature"])
  done, done_keys = parts.done_parts(
      pipeline, config["parts"], records.score_names(config["output_shapes"]))
  handler = KeyedModelHandler(model_handler.SignatureHandler(
      saved_model_dir, config["signature"],
      batch_size=config["batch_size"])).with_no_batching()
  computed = (
      batches.work_items(examples, config["input_format"],
                         config["key_feature"], done_keys,
                         config["beam_batch_size"])
      | "Decode" >> beam.ParDo(DecodeItemFn(config))
      | "Score" >> RunInference(handler)
      | "SaveParts" >> beam.ParDo(SavePartsFn(output,
                                              config["output_shapes"])))
  scores = (computed, done) | "AllParts" >> beam.Flatten()
  return write_scores(scores, output, output_format,
                      config["output_shapes"], config["num_shards"], info)


def run(saved_model_dir, inputs, output, output_format, input_format,
        key_feature, batch_size, num_shards, signature, beam_batch_size,
        resume, pipeline_args, show_progress):
  """`scoring_pipeline.run_scoring_pipeline` (which documents it)."""
  start = time.perf_counter()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  saved_model_dir = options.normalize_path(saved_model_dir)
  inputs = [options.normalize_path(p) for p in inputs]
  output = options.normalize_path(output)
  pipeline_options = options.launch_options(
      pipeline_args, {"saved_model_dir": saved_model_dir, "inputs": inputs,
                      "output": output})
  config, files, info = prepare_scoring(
      saved_model_dir, inputs, output, output_format, input_format,
      key_feature, batch_size, signature, num_shards, beam_batch_size,
      resume)
  pipeline = beam.Pipeline(options=pipeline_options)
  build_scoring_pipeline(pipeline, saved_model_dir, output, output_format,
                         config, files, info)
  start_scoring_output(output, info, resume)
  if show_progress is None:
    show_progress = options.runs_in_process(pipeline_options) and (
        sys.stderr.isatty())
  if show_progress:
    progress.start("dropvar_tf scoring")
  try:
    result = pipeline.run()
    result.wait_until_finish()
  finally:
    progress.finish()
  summary = {"seconds": time.perf_counter() - start, "examples_scored": 0,
             "examples_skipped": 0, "examples_padded": 0,
             "duplicates_dropped": 0}
  summary.update(counters.totals(result))
  return summary
