"""Apache Beam pipelines for dropvar_tf (optional extra `dropvar_tf[beam]`).

* `targets_pipeline`: MC-dropout DPV targets at scale, keyed and sharded;
  `python -m dropvar_tf.beam.targets_pipeline --help`.
* `scoring_pipeline`: batch scoring of an exported dual SavedModel
  (prediction and variation per example);
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
* `filesystems`: reads and atomic writes on any Beam file system.
* `counters`: the pipelines' Beam metrics counters.
* `progress`: the progress line of runs whose workers are in this process.
"""

from dropvar_tf.beam.records import model_input_specs
from dropvar_tf.beam.records import read_scores
from dropvar_tf.beam.records import read_targets
from dropvar_tf.beam.records import shard_of
from dropvar_tf.beam.records import signature_input_specs
from dropvar_tf.beam.records import write_examples
