"""The pipelines' own flags, parsed before TensorFlow or Beam is loaded.

Importing TensorFlow takes seconds and `apache_beam` seconds more, so the
command lines parse their own flags first, with nothing but argparse:
`--help`, a missing required flag, a bad value or choice are answered at
once. One table of definitions (`add_targets_flags`, `add_scoring_flags`)
serves both this parser and the Beam `PipelineOptions` subclasses of
`options`, so the two always agree.

    args, rest = flags.parse(flags.TARGETS, argv)   # exits 0 or 2 on misuse
    if rest:                                        # Beam's, or mistyped
      options.refuse_unknown(argv)                  # imports apache_beam

Flags this parser does not know (`rest`) are Beam's (`--runner`, ...) or
mistyped: only Beam's own option classes can tell which, so `options`
checks them once the pipeline needs Beam anyway.
"""

import argparse
import os
import sys

from dropvar_tf import contract
from dropvar_tf.beam import formats

TARGETS = "targets"
SCORING = "scoring"

_EPILOG = (
    "Beam's flags (--runner, --direct_num_workers, --project, ...) share the "
    "command line; see Beam's PipelineOptions. An unknown or mistyped flag "
    "is a usage error.")


def _format_metavar(formats_):
  return "{" + ",".join(formats_) + "}"


def add_targets_flags(group):
  """Adds the targets pipeline's flags to an argparse parser or group.

  No flag is `required=True` and `--output_format` has no `choices`: Beam
  parses every options class against every pipeline's flags (see
  `options`); `REQUIRED` and the pipelines check them instead.
  """
  group.add_argument("--model", help="base model .keras file")
  group.add_argument("--input", action="append",
                     help="TFRecord or .npz file pattern (repeatable)")
  group.add_argument("--output", help="output directory")
  group.add_argument("--num_samples", type=int, default=100)
  group.add_argument("--seed", type=int, default=0)
  group.add_argument("--statistic", default="auto",
                     choices=contract.STATISTICS,
                     help="DPV statistic (of each output, for a model of "
                     "several)")
  group.add_argument("--batch_size", type=int, default=256)
  group.add_argument("--beam_batch_size", type=int, default=None)
  group.add_argument("--num_shards", type=int, default=8)
  group.add_argument("--output_format", default=formats.TFRECORD,
                     metavar=_format_metavar(formats.TARGET_FORMATS))
  group.add_argument("--input_format", default=formats.AUTO,
                     choices=formats.INPUT_FORMATS)
  group.add_argument("--key_feature", default=formats.KEY_FEATURE)
  group.add_argument("--input_feature", default=None)
  group.add_argument("--no_resume", action="store_true",
                     help="clear earlier shards instead of reusing them")
  group.add_argument("--import_module", action="append", default=[],
                     help="module to import first (custom layers; "
                     "repeatable)")
  group.add_argument("--verbose", action="store_true",
                     help="show Beam's INFO logs (off by default)")


def add_scoring_flags(group):
  """Adds the scoring pipeline's flags to an argparse parser or group."""
  group.add_argument("--saved_model", help="SavedModel version folder")
  group.add_argument("--input", action="append",
                     help="TFRecord or .npz file pattern (repeatable)")
  group.add_argument("--output", help="output directory")
  group.add_argument("--output_format", default=formats.PARQUET,
                     metavar=_format_metavar(formats.SCORE_FORMATS))
  group.add_argument("--input_format", default=formats.AUTO,
                     choices=formats.INPUT_FORMATS)
  group.add_argument("--key_feature", default=formats.KEY_FEATURE)
  group.add_argument("--batch_size", type=int, default=256)
  group.add_argument("--beam_batch_size", type=int, default=None)
  group.add_argument("--num_shards", type=int, default=8)
  group.add_argument("--signature", default=contract.SERVING_SIGNATURE)
  group.add_argument("--no_resume", action="store_true",
                     help="clear earlier scores instead of reusing them")
  group.add_argument("--verbose", action="store_true",
                     help="show Beam's INFO logs (off by default)")


# Per pipeline: (title, description, flag definitions, required flags).
PIPELINES = {
    TARGETS: ("dropvar_tf targets pipeline",
              "MC-dropout DPV targets with Apache Beam.",
              add_targets_flags, ("model", "input", "output")),
    SCORING: ("dropvar_tf scoring pipeline",
              "Score a dual SavedModel over a data set with Apache Beam.",
              add_scoring_flags, ("saved_model", "input", "output")),
}


def usage_error(message):
  """Writes `prog: error: message` to stderr; raises SystemExit(2)."""
  prog = os.path.basename(sys.argv[0])
  sys.stderr.write(f"{prog}: error: {message}\n")
  raise SystemExit(2)


def require(args, names):
  """Exits with a usage error when a required flag is missing.

  Args:
    args: parsed flags (an argparse namespace or a Beam options view).
    names: the required flags' names, without "--".

  Raises:
    SystemExit: with status 2, as argparse exits on a missing required flag,
      after writing the missing flags to stderr.
  """
  missing = [f"--{name}" for name in names if getattr(args, name) is None]
  if missing:
    usage_error(f"the following arguments are required: "
                f"{', '.join(missing)}")


def parser(pipeline):
  """The argparse parser of `pipeline`'s own flags (with `--help`)."""
  title, description, add_flags, _ = PIPELINES[pipeline]
  result = argparse.ArgumentParser(
      prog=f"python -m dropvar_tf.beam.{pipeline}_pipeline",
      description=description, epilog=_EPILOG, allow_abbrev=False)
  add_flags(result.add_argument_group(title))
  return result


def parse(pipeline, argv):
  """Parses `pipeline`'s own flags from `argv`; Beam's are left over.

  Args:
    pipeline: `TARGETS` or `SCORING`.
    argv: the command-line arguments.

  Returns:
    (args, rest): the parsed flags (argparse namespace) and the arguments
    this parser does not know, as written (Beam's flags, or mistyped ones:
    see `options.refuse_unknown`).

  Raises:
    SystemExit: status 0 after `--help`; status 2, with the error on
      stderr, for a bad value or a missing required flag.
  """
  args, rest = parser(pipeline).parse_known_args(list(argv))
  require(args, PIPELINES[pipeline][3])
  check_values(pipeline, args)
  return args, rest


# Per pipeline: the smallest value of each integer flag.
_LOWER_BOUNDS = {
    TARGETS: {"num_samples": 2, "batch_size": 1, "num_shards": 1,
              "beam_batch_size": 1},
    SCORING: {"batch_size": 1, "num_shards": 1, "beam_batch_size": 1},
}


def check_values(pipeline, args):
  """Exits with a usage error for an out-of-range number or unknown format.

  argparse checks types and `choices`; `--output_format` has no `choices`
  (see `add_targets_flags`) and the numbers no bounds, so they are checked
  here, before any work.

  Raises:
    SystemExit: with status 2, the flag and its value on stderr.
  """
  for name, lowest in _LOWER_BOUNDS[pipeline].items():
    value = getattr(args, name)
    if value is not None and value < lowest:
      usage_error(f"argument --{name}: expected an integer >= {lowest}, "
                  f"got {value}")
  allowed = (formats.TARGET_FORMATS if pipeline == TARGETS
             else formats.SCORE_FORMATS)
  if args.output_format not in allowed:
    usage_error(f"argument --output_format: expected one of "
                f"{', '.join(allowed)}, got {args.output_format!r}")


def run_error(error):
  """Writes `prog: error: <error>` to stderr; returns exit status 1.

  A bad file or input found once the pipeline runs: its message, without a
  traceback.
  """
  prog = os.path.basename(sys.argv[0])
  sys.stderr.write(f"{prog}: error: {error}\n")
  return 1
