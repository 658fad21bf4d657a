"""Apache Beam pipelines for dropvar_tf (optional extra `dropvar_tf[beam]`).

* `targets_pipeline`: MC-dropout DPV targets at scale, keyed and sharded;
  `python -m dropvar_tf.beam.targets_pipeline --help`.
* `scoring_pipeline`: batch scoring of an exported dual SavedModel
  (prediction and variation per example, one pair per output of a model
  of several outputs, and out_of_range when the signature returns it);
  `python -m dropvar_tf.beam.scoring_pipeline --help`.
* `records`: the file formats, the input adapter `write_examples` and the
  readers `read_targets(path)` / `read_scores(path)` (format and shapes from
  the run's own JSON). It does not need `apache_beam`; the modules below
  do, so import them explicitly (except `progress`, which does not either).
* `model_handler`: Beam's TensorFlow model handler for a SavedModel
  signature (`SignatureHandler`), what the scoring pipeline runs through
  `RunInference`.
* `options`: the pipelines' flags as Beam `PipelineOptions` subclasses.
* `sources`: matching, reading and decoding input examples in a pipeline.
* `batches`: work items of fixed size by key rank, not by bundle.
* `parts`: the part file of each computed work item (what a rerun skips).
* `targets_transforms`, `scoring_transforms`: each pipeline's transforms,
  imported by the entry points only when a run starts.
* `filesystems`: reads and atomic writes on any Beam file system.
* `counters`: the pipelines' Beam metrics counters.
* `progress`: the progress line of runs whose workers are in this process.
* `flags` and `formats`: the pipelines' own flags and the format names,
  parsed and named before TensorFlow or Beam is loaded.

The names below load `records` (and TensorFlow) on first use, so that the
pipelines' command lines answer `--help` at once.
"""

import importlib

_LAZY = ("model_input_specs", "read_scores", "read_targets", "shard_of",
         "signature_input_specs", "write_examples")

__all__ = list(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module("dropvar_tf.beam.records"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
