"""The targets pipeline's transforms, files and run (Beam and TensorFlow).

`targets_pipeline` is the entry point (its docstring describes the
pipeline); it imports this module only when a run starts, so that its
command line parses flags before TensorFlow and Beam load.
"""

import importlib
import json
import math
import os
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np

from dropvar_tf import contract
from dropvar_tf import sources as dropout_sources
from dropvar_tf import target_outputs
from dropvar_tf import targets
from dropvar_tf import validation
from dropvar_tf._keras import keras
from dropvar_tf.beam import batches
from dropvar_tf.beam import counters
from dropvar_tf.beam import filesystems
from dropvar_tf.beam import formats
from dropvar_tf.beam import options
from dropvar_tf.beam import parts
from dropvar_tf.beam import progress
from dropvar_tf.beam import records
from dropvar_tf.beam import sources

# Modules that register dropvar_tf's Keras layers; imported before loading.
_REGISTERING_MODULES = ("dropvar_tf.seeded_dropout", "dropvar_tf.layers",
                        "dropvar_tf.heads", "dropvar_tf.study.models.reference")


# ---------------------------------------------------------------------------
# The base model.


def import_modules(names):
  """Imports the modules that register custom layers, then `names`."""
  for name in _REGISTERING_MODULES + tuple(names or ()):
    importlib.import_module(name)


def load_keras_model(path, extra_modules=()):
  """Loads a `.keras` file (local or any Beam file system), compile=False.

  Args:
    path: the model file.
    extra_modules: modules to import first (they register custom layers).

  Returns:
    The `keras.Model`.
  """
  import_modules(extra_modules)
  if filesystems.is_local(path):
    return keras.saving.load_model(path, compile=False)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "model.keras")
    with open(local, "wb") as f:
      f.write(filesystems.read_file_bytes(path))
    return keras.saving.load_model(local, compile=False)


# ---------------------------------------------------------------------------
# The targets pipeline.


def resolve_statistic(model, statistic):
  """The statistic and target shape settings, as `mc_dropout_targets` has them.

  Args:
    model: the base model.
    statistic: one of `contract.STATISTICS`, or for a model of several
      outputs also a dict of them keyed by output name.

  Returns:
    (statistic, target_shape, output_names). One output: the resolved
    statistic, the per-example target shape (a list) and None. Several
    (a list or a flat dict of output tensors): dicts {output name:
    statistic} and {output name: shape}, and the names in the order of
    the dict `mc_dropout_targets` returns (`keras_graph.output_names`).

  Raises:
    ValueError: an invalid `statistic`, nested outputs, or an output
      without a static shape.
  """
  outputs = target_outputs.resolve(model, statistic)
  shapes = []
  for shape, stat in zip(outputs.shapes, outputs.statistics):
    # One value per example: stored as a scalar, as the targets' (N,) has it.
    scalar = (stat == contract.STAT_PREDICTED_CLASS_STD or
              int(np.prod(shape, dtype=np.int64)) == 1)
    shapes.append([] if scalar else [int(d) for d in shape])
  if outputs.names is None:
    return outputs.statistics[0], shapes[0], None
  names = list(outputs.names)
  return (dict(zip(names, outputs.statistics)), dict(zip(names, shapes)),
          names)


class TargetsFn(beam.DoFn):
  """A work item (`batches.work_items`) -> (keys, targets), saved first.

  The model is loaded once per worker in `setup` from its `.keras` file and
  checked against the fingerprint the launcher saw. Each item's targets are
  written to `<output>/parts/` as soon as they are computed
  (`parts.write_part`), so a run that dies keeps the work it finished.
  Targets are one array, or for a model of several outputs a dict {output
  name: array} in the order of the config's "output_names".
  """

  def __init__(self, model_path, config, output_dir):
    self._model_path = model_path
    self._config = dict(config)
    self._output_dir = output_dir
    self._model = None
    self._computed = counters.counter("examples_computed")
    self._padded = counters.counter("examples_padded")

  def setup(self):
    c = self._config
    self._model = load_keras_model(self._model_path, c["import_modules"])
    if targets.model_fingerprint(self._model) != c["model_fingerprint"]:
      raise ValueError(f"The model file {self._model_path!r} changed while "
                       f"the pipeline ran (its fingerprint, of architecture "
                       "and weights, differs).")

  def process(self, item):
    c = self._config
    _, elements = item
    keys, x = sources.decode_batch([raw for _, raw in elements],
                                   c["input_format"], c["input_specs"],
                                   c["key_feature"])
    n = len(keys)
    # Pad to a whole number of compute batches: every compiled call then has
    # the shapes of the in-process run, hence bitwise-equal targets. Only
    # the run's last item is short (`batches`), so only it pads.
    rows = c["batch_size"] * math.ceil(n / c["batch_size"])
    idx = np.concatenate([np.arange(n), np.full(rows - n, n - 1)])
    values = targets.mc_dropout_targets(
        self._model, _take_rows(x, idx), num_samples=c["num_samples"],
        seed=c["seed"], batch_size=c["batch_size"],
        statistic=c["statistic"], keys=keys[idx], progress=False)
    if c["output_names"] is not None:
      values = {name: values[name] for name in c["output_names"]}
    # Sorted by key; the padded rows (after the first n) are dropped.
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], _take_rows(values, order)
    parts.write_part(self._output_dir, keys, values)
    self._computed.inc(n)
    self._padded.inc(rows - n)
    progress.add("computed", n)
    yield keys, values


def _by_shard(part, num_shards):
  keys, values = part
  shards = records.shard_of(keys, num_shards)
  for shard in np.unique(shards):
    sel = shards == shard
    yield int(shard), (keys[sel], _take_rows(values, sel))


def _take_rows(x, idx):
  """Rows `idx` of an array, or of each array of a list or dict."""
  if isinstance(x, dict):
    return {k: v[idx] for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [v[idx] for v in x]
  return x[idx]


class WriteShardFn(beam.DoFn):
  """(shard, [(keys, targets), ...]) -> one sorted shard file + its entry."""

  def __init__(self, output_dir, num_shards, output_format):
    self._output_dir = output_dir
    self._num_shards = num_shards
    self._format = output_format
    self._duplicates = counters.counter("duplicates_dropped")

  def process(self, item):
    shard, parts = item
    parts = list(parts)
    keys = np.concatenate([k for k, _ in parts])
    if isinstance(parts[0][1], dict):
      values = {name: np.concatenate([v[name] for _, v in parts])
                for name in parts[0][1]}
    else:
      values = np.concatenate([v for _, v in parts])
    keys, values, dropped = records.merge_duplicates(keys, values)
    self._duplicates.inc(dropped)
    yield write_shard(self._output_dir, shard, self._num_shards,
                      self._format, keys, values)


def write_shard(output_dir, index, num_shards, fmt, keys, values):
  """Writes one shard file atomically; returns its manifest entry.

  Args:
    output_dir: the output directory.
    index, num_shards: the shard, of how many.
    fmt: "tfrecord" or "parquet".
    keys: (n,) int64, sorted.
    values: (n, ...) float32 targets (feature "target"), or a dict {output
      name: (n, ...) float32} (features "target/<output name>", in the
      dict's order).
  """
  name = records.shard_filename(index, num_shards, fmt)
  if isinstance(values, dict):
    values = {records.target_feature(output): v
              for output, v in values.items()}
  data = records.encode_shard(keys, values, fmt)
  filesystems.atomic_write(FileSystems.join(output_dir, name), data)
  return {"index": int(index), "file": name, "count": int(len(keys)),
          "sha256": records.sha256(data)}


def finalize(entries, num_input_records, output_dir, settings):
  """Writes the empty shards and then the manifest, the run's last file.

  Returns:
    The manifest dict.
  """
  num_shards = settings["num_shards"]
  fmt = settings["output_format"]
  names = settings.get("output_names")
  shapes = settings["target_shape"]
  if names is None:
    empty = np.zeros((0,) + tuple(shapes), np.float32)
  else:
    empty = {name: np.zeros((0,) + tuple(shapes[name]), np.float32)
             for name in names}
  by_index = {e["index"]: e for e in entries}
  for index in range(num_shards):
    if index in by_index:
      continue
    # No example hashed to this shard.
    by_index[index] = write_shard(
        output_dir, index, num_shards, fmt, np.zeros((0,), np.int64), empty)
  shards = [by_index[i] for i in range(num_shards)]
  manifest = dict(settings)
  manifest.update({
      "shards": shards,
      "num_keys": int(sum(e["count"] for e in shards)),
      "num_input_records": int(num_input_records),
  })
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.MANIFEST_FILENAME),
      json.dumps(manifest, indent=2, sort_keys=True).encode())
  return manifest


def start_output(output_dir, settings, resume):
  """Makes `output_dir` this run's: called when the pipeline starts.

  Until then a launch that fails (bad flags, a model that does not load, a
  pipeline that cannot be built) leaves the directory as it was: a finished
  one stays readable. A resumed run keeps the manifest too: its shards have
  the same bytes as this run's, and `finalize` replaces it atomically.

  Side effects: creates `parts/` and writes `settings.json`; with `resume`
  False, deletes the earlier shards, parts and manifest first.

  Args:
    output_dir: the output directory (it exists).
    settings: this run's settings.
    resume: False to clear earlier results.
  """
  if not resume:
    _clear_output(output_dir)
  parts.make_parts_dir(output_dir)
  filesystems.atomic_write(
      FileSystems.join(output_dir, records.SETTINGS_FILENAME),
      json.dumps(settings, indent=2, sort_keys=True).encode())


def _clear_output(output_dir):
  """Removes earlier shards, parts and manifest (resume=False)."""
  pattern = FileSystems.join(output_dir, f"{records.SHARD_PREFIX}-*")
  paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  paths += parts.existing_parts(output_dir)
  manifest = FileSystems.join(output_dir, records.MANIFEST_FILENAME)
  if FileSystems.exists(manifest):
    paths.append(manifest)
  if paths:
    FileSystems.delete(paths)


def _check_args(num_samples, seed, batch_size, num_shards, output_format,
                beam_batch_size):
  num_samples = validation.check_int(num_samples, "num_samples", 2)
  seed = validation.check_int(seed, "seed", 0)
  if seed >= 2**32:
    raise validation.invalid("seed", "an integer in [0, 2**32)", seed)
  batch_size = validation.check_int(batch_size, "batch_size", 1)
  num_shards = validation.check_int(num_shards, "num_shards", 1)
  records.check_format(output_format, formats.TARGET_FORMATS)
  if beam_batch_size is None:
    beam_batch_size = 8 * batch_size
  beam_batch_size = validation.check_int(beam_batch_size, "beam_batch_size",
                                         1)
  if beam_batch_size % batch_size:
    raise validation.invalid(
        "beam_batch_size", f"a multiple of batch_size ({batch_size}), so "
        f"that no compute batch is padded but the last", beam_batch_size)
  return num_samples, seed, batch_size, num_shards, beam_batch_size


def prepare_targets(model_path, inputs, output, num_samples=100, seed=0,
                    statistic="auto", batch_size=256, num_shards=8,
                    output_format=records.TFRECORD, input_format="auto",
                    key_feature=records.KEY_FEATURE, input_feature=None,
                    beam_batch_size=None, resume=True, extra_modules=()):
  """Validates everything on the launcher; reads earlier results.

  Changes nothing in `output` but creating it: `start_output` writes there
  once the pipeline starts.

  Returns:
    (settings, config, files): settings.json content, the worker config
    (with the part files of an earlier run to resume) and the matched input
    files.

  Raises:
    ValueError: an invalid argument, or `output` holds a run with other
      settings (and `resume` is True).
    FileNotFoundError: an input pattern matches nothing.
  """
  num_samples, seed, batch_size, num_shards, beam_batch_size = _check_args(
      num_samples, seed, batch_size, num_shards, output_format,
      beam_batch_size)
  if isinstance(inputs, str):
    inputs = [inputs]
  files = sources.match_inputs(inputs)
  input_format = sources.resolve_input_format(input_format, files)
  model = load_keras_model(model_path, extra_modules)
  dropout_sources.check_dropout_model(model)
  statistic, target_shape, output_names = resolve_statistic(model, statistic)
  input_specs = records.model_input_specs(model, input_feature)
  settings = {
      "format_version": records.FORMAT_VERSION,
      "model_fingerprint": targets.model_fingerprint(model),
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "target_shape": target_shape,
      "num_shards": num_shards,
      "output_format": output_format,
      "key_feature": key_feature,
      "input_specs": input_specs,
      "input_format": input_format,
      "input_files": [[p, s] for p, s in files],
  }
  if output_names is not None:
    # Only for several outputs: a single output's settings stay as they were.
    settings["output_names"] = output_names
  if not FileSystems.exists(output):
    FileSystems.mkdirs(output)
  parts.check_settings(output, settings, resume)
  config = {
      "model_fingerprint": settings["model_fingerprint"],
      "num_samples": num_samples,
      "seed": seed,
      "statistic": statistic,
      "batch_size": batch_size,
      "beam_batch_size": beam_batch_size,
      "num_shards": num_shards,
      "parts": parts.existing_parts(output) if resume else [],
      "input_format": input_format,
      "input_specs": input_specs,
      "key_feature": key_feature,
      "import_modules": list(extra_modules or ()),
      "output_names": output_names,
  }
  return settings, config, files


def build_targets_pipeline(pipeline, model_path, output, settings, config,
                           files):
  """Adds the targets transforms to `pipeline`; returns the manifest PColl."""
  examples = sources.read_examples(pipeline, files, config["input_format"],
                                   config["input_specs"],
                                   config["key_feature"])
  count = examples | "CountInputs" >> beam.combiners.Count.Globally()
  done, done_keys = parts.done_parts(pipeline, config["parts"],
                                     config["output_names"])
  computed = (
      batches.work_items(examples, config["input_format"],
                         config["key_feature"], done_keys,
                         config["beam_batch_size"])
      | "MCTargets" >> beam.ParDo(TargetsFn(model_path, config, output)))
  entries = (
      (computed, done)
      | "AllParts" >> beam.Flatten()
      | "ByShard" >> beam.FlatMap(_by_shard, config["num_shards"])
      | "GroupByShard" >> beam.GroupByKey()
      | "WriteShards" >> beam.ParDo(WriteShardFn(
          output, config["num_shards"], settings["output_format"])))
  return (entries
          | "CollectShards" >> beam.combiners.ToList()
          | "WriteManifest" >> beam.Map(
              finalize, beam.pvalue.AsSingleton(count), output, settings))


def _normalize_paths(model, inputs, output):
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  return (options.normalize_path(model),
          [options.normalize_path(p) for p in inputs],
          options.normalize_path(output))


def run(model_path, inputs, output, num_samples, seed, statistic,
        batch_size, num_shards, output_format, input_format,
        key_feature, input_feature, beam_batch_size, resume,
        extra_modules, pipeline_args, show_progress):
  """`targets_pipeline.run_targets_pipeline` (which documents it)."""
  start = time.perf_counter()
  model_path, inputs, output = _normalize_paths(model_path, inputs, output)
  pipeline_options = options.launch_options(
      pipeline_args, {"model_path": model_path, "inputs": inputs,
                      "output": output})
  settings, config, files = prepare_targets(
      model_path, inputs, output, num_samples=num_samples, seed=seed,
      statistic=statistic, batch_size=batch_size, num_shards=num_shards,
      output_format=output_format, input_format=input_format,
      key_feature=key_feature, input_feature=input_feature,
      beam_batch_size=beam_batch_size, resume=resume,
      extra_modules=extra_modules)
  pipeline = beam.Pipeline(options=pipeline_options)
  build_targets_pipeline(pipeline, model_path, output, settings, config, files)
  start_output(output, settings, resume)
  if show_progress is None:
    show_progress = options.runs_in_process(pipeline_options) and (
        sys.stderr.isatty())
  if show_progress:
    progress.start("dropvar_tf targets")
  try:
    result = pipeline.run()
    result.wait_until_finish()
  finally:
    progress.finish()
  manifest = records.read_json(
      FileSystems.join(output, records.MANIFEST_FILENAME)) if (
          filesystems.is_local(output)) else None
  summary = {"manifest": manifest,
             "seconds": time.perf_counter() - start,
             "examples_computed": 0, "examples_skipped": 0,
             "examples_padded": 0, "duplicates_dropped": 0}
  summary.update(counters.totals(result))
  return summary
