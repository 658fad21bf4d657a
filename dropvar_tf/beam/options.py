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

Beam itself drops flags no options class knows, with a log line, and runs
on: `unknown_flags` finds them, so that `parse` (the pipelines' `main`)
refuses a mistyped flag before any work. `check_runner` refuses, before
anything loads or writes, a runner that cannot work: a remote one with local
paths, or one whose extra is not installed.
"""

import difflib
import importlib.util
import logging
import os
import urllib.parse

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import PortableOptions
from apache_beam.options.pipeline_options import StandardOptions

from dropvar_tf.beam import filesystems
from dropvar_tf.beam import flags


def _group(parser, pipeline):
  title, description, add_flags, _ = flags.PIPELINES[pipeline]
  add_flags(parser.add_argument_group(
      title, description + " Unknown flags (--runner, "
      "--direct_num_workers, --project, ...) go to Beam.",
      conflict_handler="resolve"))


# Runners that run every worker on this machine (short names, see
# `runner_name`), so local paths work.
LOCAL_RUNNERS = ("direct", "bundlebaseddirect", "switchingdirect", "prism",
                 "interactive")
# Modules a runner needs beyond apache-beam itself, and the extra that
# brings them.
RUNNER_EXTRAS = {
    "dataflow": (("google.cloud.dataflow", "google.cloud.storage"),
                 "apache-beam[gcp]"),
}
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def _check_argv_flags(argv):
  """Raises SystemExit(2) naming the flags of `argv` no options class knows.

  Beam builds one parser from every `PipelineOptions` subclass and hands it
  to `add_extra_args_fn` before parsing; this check runs there, on that
  parser, so it knows exactly the flags Beam would keep.
  """

  def check(parser):
    _, unknown = parser.parse_known_args(argv)
    if unknown:
      # The defaults' namespace names every flag's destination.
      defaults = vars(parser.parse_known_args([])[0])
      raise _UnknownFlagsError(unknown, [f"--{dest}" for dest in defaults])

  PipelineOptions(argv).get_all_options(add_extra_args_fn=check)


class _UnknownFlagsError(Exception):

  def __init__(self, unknown, known):
    super().__init__(unknown)
    self.unknown = unknown
    self.known = known


def unknown_flags(argv):
  """Arguments of `argv` that no Beam options class knows (Beam drops them).

  Args:
    argv: command-line arguments (our flags and Beam's).

  Returns:
    The unknown arguments as written, each with a close known flag when
    there is one: [(argument, suggestion or None)].
  """
  try:
    _check_argv_flags(list(argv))
  except _UnknownFlagsError as e:
    out = []
    for arg in e.unknown:
      name = arg.split("=", 1)[0]
      close = difflib.get_close_matches(
          name.replace("-", "_").replace("__", "--"), e.known, n=1)
      out.append((arg, close[0] if close and arg.startswith("-") else None))
    return out
  return []


def describe_unknown(unknown):
  """One line naming unknown arguments and their close known flags."""
  parts = [f"{arg} (did you mean {close}?)" if close else arg
           for arg, close in unknown]
  return "unrecognized arguments: " + " ".join(parts)


def parse(cls, argv):
  """Parses a pipeline's command line; exits with a usage error on misuse.

  Args:
    cls: `TargetsOptions` or `ScoringOptions`.
    argv: the command-line arguments.

  Returns:
    The `cls` view of `argv`.

  Raises:
    SystemExit: status 2, after writing the error to stderr, when an
      argument is unknown (a mistyped flag would otherwise be dropped and
      its default used) or a required flag is missing.
  """
  parsed = cls(argv)
  refuse_unknown(argv)
  require(parsed, cls.REQUIRED)
  return parsed


def refuse_unknown(argv):
  """Exits with a usage error naming the arguments no options class knows.

  Args:
    argv: the command-line arguments (our flags and Beam's).

  Raises:
    SystemExit: status 2, after writing the unknown arguments and their
      close known flags to stderr.
  """
  unknown = unknown_flags(argv)
  if unknown:
    flags.usage_error(describe_unknown(unknown))


def runner_name(pipeline_options):
  """Short, lower-case name of the runner: "direct", "dataflow", ...

  Args:
    pipeline_options: a `PipelineOptions`.

  Returns:
    The `--runner` value without module path and "Runner" suffix, lower
    case ("direct" when none is given, Beam's default).
  """
  runner = pipeline_options.view_as(StandardOptions).runner
  if runner is None:
    return "direct"
  if not isinstance(runner, str):
    runner = type(runner).__name__
  name = runner.rsplit(".", 1)[-1].lower()
  return name[:-len("runner")] if name.endswith("runner") else name


def is_local_runner(pipeline_options):
  """Whether every worker of the run is on this machine (local paths work).

  The DirectRunner and Prism are; the PortableRunner is with an embedded or
  localhost job service; Flink and Spark are with their local masters.
  """
  name = runner_name(pipeline_options)
  if name in LOCAL_RUNNERS:
    return True
  flags = pipeline_options.get_all_options()
  if name == "portable":
    endpoint = pipeline_options.view_as(PortableOptions).job_endpoint
    if endpoint in (None, "embed"):
      return True
    host = urllib.parse.urlsplit(f"//{endpoint}").hostname
    return host in _LOCAL_HOSTS
  if name == "flink":
    return flags.get("flink_master") in ("[local]", "[auto]")
  if name == "spark":
    return str(flags.get("spark_master_url", "")).startswith("local")
  return False


def runs_in_process(pipeline_options):
  """Whether the workers run in this process (DirectRunner, not processes)."""
  if runner_name(pipeline_options) not in ("direct", "bundlebaseddirect",
                                           "switchingdirect"):
    return False
  mode = pipeline_options.view_as(DirectOptions).direct_running_mode
  return mode != "multi_processing"


def quiet_beam_logs(pipeline_args):
  """Turns Beam's INFO logs off here and in the workers; returns the args.

  Side effects: sets the "apache_beam" logger of this process to WARNING.

  Args:
    pipeline_args: Beam flags; a `--default_sdk_harness_log_level` among
      them wins.

  Returns:
    `pipeline_args` with `--default_sdk_harness_log_level=WARNING` added
    (the workers' level) unless given.
  """
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  args = list(pipeline_args)
  if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=WARNING")
  return args


def _invalid(arg, expected, received):
  # `validation` loads TensorFlow: only a refused run pays for it, so that
  # the flag checks of `main` (`refuse_unknown`) finish before it loads.
  from dropvar_tf import validation
  return validation.invalid(arg, expected, received)


def _installed(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def check_runner(pipeline_options, paths):
  """Refuses a run that cannot work on its runner, before any work.

  Args:
    pipeline_options: the run's `PipelineOptions`.
    paths: {argument name: path or list of paths} the workers read or write.

  Raises:
    ValueError: the runner needs an extra that is not installed, or is not
      local and a path is on the local file system (its workers cannot see
      this machine's files).
  """
  name = runner_name(pipeline_options)
  modules, extra = RUNNER_EXTRAS.get(name, ((), None))
  missing = [m for m in modules if not _installed(m)]
  if missing:
    raise _invalid(
        "runner", f"a runner whose extra is installed (pip install "
        f"'{extra}'; missing {missing})", name)
  if is_local_runner(pipeline_options):
    return
  for arg, value in paths.items():
    for path in [value] if isinstance(value, str) else value:
      if filesystems.is_local(path):
        raise _invalid(
            arg, f"a path every {name} worker can read (gs://, s3://, "
            f"hdfs://, ...), not a local one", path)


def launch_options(pipeline_args, paths):
  """The `PipelineOptions` of a run, once its flags and runner are checked.

  Args:
    pipeline_args: Beam flags (flags of `TargetsOptions` or `ScoringOptions`
      may be among them).
    paths: {argument name: path or list of paths} the workers read or write
      (see `check_runner`).

  Returns:
    `PipelineOptions(pipeline_args)`.

  Raises:
    ValueError: an argument no options class knows, or a runner that
      cannot run with these paths or lacks its extra.
  """
  args = list(pipeline_args or [])
  unknown = unknown_flags(args)
  if unknown:
    raise _invalid(
        "pipeline_args", "flags of Beam or of the pipeline",
        describe_unknown(unknown))
  result = PipelineOptions(args)
  check_runner(result, paths)
  return result


def normalize_path(path):
  """An absolute local path (user and dots expanded), or a URI as it is.

  Paths are compared as written (settings of a resumed run): the same file
  must have one spelling.
  """
  if filesystems.is_local(path) and not path.startswith("file://"):
    return os.path.abspath(os.path.expanduser(path))
  return path


require = flags.require


class TargetsOptions(PipelineOptions):
  """Flags of `python -m dropvar_tf.beam.targets_pipeline`.

  Required: --model, --input, --output (see `require`). The definitions are
  `flags.add_targets_flags`.
  """

  REQUIRED = flags.PIPELINES[flags.TARGETS][3]

  @classmethod
  def _add_argparse_args(cls, parser):
    _group(parser, flags.TARGETS)


class ScoringOptions(PipelineOptions):
  """Flags of `python -m dropvar_tf.beam.scoring_pipeline`.

  Required: --saved_model, --input, --output (see `require`). The
  definitions are `flags.add_scoring_flags`.
  """

  REQUIRED = flags.PIPELINES[flags.SCORING][3]

  @classmethod
  def _add_argparse_args(cls, parser):
    _group(parser, flags.SCORING)
