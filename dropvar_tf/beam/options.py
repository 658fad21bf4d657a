"""Flags of the Beam pipelines, as Beam `PipelineOptions` subclasses.

    options = TargetsOptions(argv)        # our flags and Beam's, one argv
    options.model, options.num_samples    # ours
    beam.Pipeline(options=options)        # --runner and the rest: Beam's

Beam parses every `PipelineOptions` subclass it knows against every
pipeline's flags (`get_all_options`, when it ships options to workers). Two
consequences shape the classes here:

* Both pipelines have flags of the same name (`--input`, `--output_format`,
  `--num_shards`, ...), some with other defaults. Each class declares its
  flags in its own argument group that resolves such clashes, so both
  classes can be loaded in one process; a view of either class still parses
  with exactly its own definitions.
* No flag is `required=True` and `--output_format` has no argparse
  `choices`: a scoring run's flags must parse under the targets pipeline's
  definitions too. `require` checks the required flags in `main`, and the
  pipelines check the format (`records.check_format`).
"""

import os
import sys

from apache_beam.options.pipeline_options import PipelineOptions

from dropvar_tf import contract
from dropvar_tf.beam import records
from dropvar_tf.beam import sources


def _group(parser, title, description):
  return parser.add_argument_group(title, description,
                                   conflict_handler="resolve")


def _format_metavar(formats):
  return "{" + ",".join(formats) + "}"


def require(options, names):
  """Exits with a usage error when a required flag is missing.

  Args:
    options: a parsed options view (`TargetsOptions`, `ScoringOptions`).
    names: the required flags' names, without "--".

  Raises:
    SystemExit: with status 2, as argparse exits on a missing required flag,
      after writing the missing flags to stderr.
  """
  missing = [f"--{name}" for name in names if getattr(options, name) is None]
  if missing:
    prog = os.path.basename(sys.argv[0])
    sys.stderr.write(f"{prog}: error: the following arguments are required: "
                     f"{', '.join(missing)}\n")
    raise SystemExit(2)


class TargetsOptions(PipelineOptions):
  """Flags of `python -m dropvar_tf.beam.targets_pipeline`.

  Required: --model, --input, --output (see `require`).
  """

  REQUIRED = ("model", "input", "output")

  @classmethod
  def _add_argparse_args(cls, parser):
    group = _group(
        parser, "dropvar_tf targets pipeline",
        "MC-dropout DPV targets with Apache Beam. Unknown flags "
        "(--runner, --direct_num_workers, --project, ...) go to Beam.")
    group.add_argument("--model", help="base model .keras file")
    group.add_argument("--input", action="append",
                       help="TFRecord or .npz file pattern (repeatable)")
    group.add_argument("--output", help="output directory")
    group.add_argument("--num_samples", type=int, default=100)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--statistic", default="auto",
                       choices=contract.STATISTICS)
    group.add_argument("--batch_size", type=int, default=256)
    group.add_argument("--beam_batch_size", type=int, default=None)
    group.add_argument("--num_shards", type=int, default=8)
    group.add_argument("--output_format", default=records.TFRECORD,
                       metavar=_format_metavar(records.TARGET_FORMATS))
    group.add_argument("--input_format", default="auto",
                       choices=sources.INPUT_FORMATS)
    group.add_argument("--key_feature", default=records.KEY_FEATURE)
    group.add_argument("--input_feature", default=None)
    group.add_argument("--no_resume", action="store_true",
                       help="clear earlier shards instead of reusing them")
    group.add_argument("--import_module", action="append", default=[],
                       help="module to import first (custom layers; "
                       "repeatable)")


class ScoringOptions(PipelineOptions):
  """Flags of `python -m dropvar_tf.beam.scoring_pipeline`.

  Required: --saved_model, --input, --output (see `require`).
  """

  REQUIRED = ("saved_model", "input", "output")

  @classmethod
  def _add_argparse_args(cls, parser):
    group = _group(
        parser, "dropvar_tf scoring pipeline",
        "Score a dual SavedModel over a data set with Apache Beam. Unknown "
        "flags (--runner, --direct_num_workers, ...) go to Beam.")
    group.add_argument("--saved_model", help="SavedModel version folder")
    group.add_argument("--input", action="append",
                       help="TFRecord or .npz file pattern (repeatable)")
    group.add_argument("--output", help="output directory")
    group.add_argument("--output_format", default=records.PARQUET,
                       metavar=_format_metavar(records.SCORE_FORMATS))
    group.add_argument("--input_format", default="auto",
                       choices=sources.INPUT_FORMATS)
    group.add_argument("--key_feature", default=records.KEY_FEATURE)
    group.add_argument("--batch_size", type=int, default=256)
    group.add_argument("--num_shards", type=int, default=0)
    group.add_argument("--signature", default=contract.SERVING_SIGNATURE)
