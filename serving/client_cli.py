"""`dropvar_client`: query a served dual model from the command line.

  dropvar_client predict --target=localhost:8500 --model_name=movies \
      --input=request.json
  dropvar_client metadata --target=localhost:8500 --model_name=movies
  dropvar_client status --target=localhost:8500 --model_name=movies

`--input` is a JSON file: {"inputs": {name: nested list, ...}} (or
{"inputs": nested list} for a single-input signature), TF Serving's row
format {"instances": [row, ...]} (rows, or {name: value} objects), or a
bare nested list; bytes as TF Serving's {"b64": "<base64>"}; a
"signature_name" key of the file is used as `--signature` (a different
`--signature` given too is refused). Or a `.npy` file (one array) or `.npz`
file (one array per input name).
Output is JSON on stdout: {"prediction", "variation", "model_version"} for
predict (plus "outputs" for other aliases). A dual of a multi-output model
gives "prediction" and "variation" null and adds "predictions" and
"variations", each {output name: nested list}. A dual with an
"out_of_range" output adds it as "out_of_range" (one number per input).
`metadata` prints the
signatures and, for a version written by `export_saved_model`, its metadata
("export_metadata"), the head's "fit_report" and a one-line "fit_summary",
indented. Exit code 1 and the gRPC code on stderr when the server refuses the
request; exit code 1 and one line on stderr for an unreadable `--input` or
a bad flag value.
"""

import base64
import binascii
import json
import logging
import sys

from absl import app
from absl import flags
import numpy as np

from dropvar_tf import array_files
from dropvar_tf import cli_help
from dropvar_tf import contract
from dropvar_tf import saved_model
from dropvar_tf.serving import client as client_lib
from dropvar_tf.serving import errors
from dropvar_tf.serving import json_codec

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """Defines the client's flags on `flag_values`.

  Called by `run_main`, not at import, so that other absl tools (the server
  defines `--model_name` too) can be imported into the same process.

  Args:
    flag_values: the `flags.FlagValues` to define them on.
  """
  flags.DEFINE_string("target", "localhost:8500", "host:port of the server.",
                      flag_values=flag_values)
  flags.DEFINE_string("model_name", None, "Served model name.",
                      flag_values=flag_values)
  flags.DEFINE_string("signature", contract.SERVING_SIGNATURE,
                      "Signature to call.", flag_values=flag_values)
  flags.DEFINE_integer("version", None, "Model version (default: latest).",
                       flag_values=flag_values)
  flags.DEFINE_string("version_label", None,
                      "Version label instead of --version.",
                      flag_values=flag_values)
  flags.DEFINE_string("input", None,
                      "Request inputs: .json, .npy or .npz file.",
                      flag_values=flag_values)
  flags.DEFINE_list("output_filter", None,
                    "Output aliases to return, e.g. variation (default: all).",
                    flag_values=flag_values)
  flags.DEFINE_float("timeout", 10.0, "Deadline per RPC, seconds.",
                     flag_values=flag_values)
  flags.DEFINE_enum("protocol", "grpc", ["grpc", "rest"],
                    "gRPC, or TF Serving's REST API (then --target is the "
                    "REST port, e.g. localhost:8501).",
                    flag_values=flag_values)


COMMANDS = ("predict", "metadata", "status")


def load_inputs(path):
  """Reads request inputs from a .json, .npy or .npz file.

  Args:
    path: the file.

  Returns:
    A numpy array (single input) or a dict {name: numpy array}.

  Raises:
    ValueError: unknown extension, JSON of the wrong shape, or an array of
      Python objects.
  """
  return load_request(path)[0]


def load_request(path):
  """Reads request inputs, and the signature a JSON body names, from a file.

  Args:
    path: a .json, .npy or .npz file.

  Returns:
    (inputs as `load_inputs` returns them, the JSON's "signature_name" or
    None).

  Raises:
    ValueError: as `load_inputs`, or a "signature_name" that is not a
      non-empty string.
  """
  if path.endswith(".npy"):
    return array_files.load_npy(path), None
  if path.endswith(".npz"):
    return array_files.load_npz(path), None
  if not path.endswith(".json"):
    raise ValueError(f"--input must end in .json, .npy or .npz; got {path}.")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}.") from None
  signature = None
  if isinstance(data, dict):
    keys = sorted(set(data) & {"inputs", "instances"})
    if len(keys) != 1:
      raise ValueError(
          f"{path}: expected {{\"inputs\": ...}} (columns), "
          f"{{\"instances\": [...]}} (rows, as TF Serving's REST API "
          f"takes them) or a bare list; got keys {sorted(data)}.")
    signature = data.get("signature_name")
    if signature is not None and (not isinstance(signature, str) or
                                  not signature):
      raise ValueError(f"{path}: \"signature_name\" must be a non-empty "
                       f"string; got {signature!r}.")
    data = (_columns(data["instances"], path) if keys == ["instances"]
            else data["inputs"])
  if isinstance(data, dict) and not json_codec.is_base64_object(data):
    return {name: _array(value, f"{path}: input {name!r}")
            for name, value in data.items()}, signature
  if json_codec.is_base64_object(data):
    return _array(data, path), signature
  if isinstance(data, list):
    return _array(data, path), signature
  raise ValueError(f"{path}: inputs must be a dict or a nested list.")


def _decoded(value, what):
  """Nested JSON with TF Serving's {"b64": "..."} objects decoded to bytes."""
  if isinstance(value, list):
    return [_decoded(v, what) for v in value]
  if isinstance(value, dict):
    if (not json_codec.is_base64_object(value) or
        not isinstance(value["b64"], str)):
      raise ValueError(f"{what}: an object in a tensor must be "
                       f"{{\"b64\": \"<base64>\"}}; got {value!r}.")
    try:
      return base64.b64decode(value["b64"], validate=True)
    except binascii.Error as e:
      raise ValueError(f"{what}: {value['b64']!r} is not base64 ({e})."
                       ) from None
  return value


def _array(value, what):
  """A nested list as a numpy array; ragged rows refused."""
  try:
    return np.asarray(_decoded(value, what))
  except ValueError as e:
    if str(e).startswith(what):
      raise
    raise ValueError(f"{what}: rows of different lengths (ragged inputs "
                     "cannot be sent as one tensor).") from None


def _columns(instances, path):
  """TF Serving's row format: a list of rows, or of {input name: value}."""
  if not isinstance(instances, list) or not instances:
    raise ValueError(f"{path}: \"instances\" must be a non-empty list.")
  named = [isinstance(row, dict) and not json_codec.is_base64_object(row)
           for row in instances]
  if not all(named):
    if any(named):
      raise ValueError(f"{path}: \"instances\" mixes named and bare rows.")
    return instances
  names = sorted(instances[0])
  if any(sorted(row) != names for row in instances):
    raise ValueError(f"{path}: every instance must name the same inputs "
                     f"{names}.")
  return {name: [row[name] for row in instances] for name in names}


def _jsonable(array):
  return None if array is None else np.asarray(array).tolist()


def fit_summary(report):
  """One line saying how well the served head fits, from its fit report.

  Args:
    report: the "fit_report" of the export's metadata
      (`metrics.fit_report`), or None.

  Returns:
    A sentence: held-out Spearman, R^2 and mean ratio against the noise
    bound, and the reasons when the fit is far below it.
  """
  if not report:
    return "No fit report: the head was fitted without held-out inputs."

  def text(value):
    return "n/a" if value is None else f"{value:.3f}"

  bound = report.get("noise_bound") or {}
  line = (f"On {report.get('num_examples')} held-out calibration inputs: "
          f"Spearman {text(report.get('spearman'))} (bound "
          f"{text(bound.get('correlation'))}), R^2 {text(report.get('r2'))} "
          f"(bound {text(bound.get('r2'))}), mean estimate / mean target "
          f"{text(report.get('mean_ratio'))}.")
  reasons = report.get("far_below_bound") or []
  if reasons:
    line += " Far below the bound: " + "; ".join(reasons) + "."
  else:
    line += " Near the noise bound."
  return line


def run_command(command, client, inputs=None, output_filter=None):
  """Runs one command with `client`; returns a JSON-able dict."""
  if command == "predict":
    result = client.predict(inputs, output_filter=output_filter)
    out = {"prediction": _jsonable(result.prediction),
           "variation": _jsonable(result.variation),
           "model_version": result.model_version}
    if result.out_of_range is not None:
      out["out_of_range"] = _jsonable(result.out_of_range)
    per_output = {"predictions": result.predictions,
                  "variations": result.variations}
    if any(per_output.values()):  # a multi-output dual
      out.update({key: {name: _jsonable(v) for name, v in values.items()}
                  for key, values in per_output.items()})
    known = set(contract.output_keys(
        list(result.predictions) + list(result.variations),
        out_of_range=True)) | set(contract.OUTPUT_KEYS)
    extra = {k: _jsonable(v) for k, v in result.outputs.items()
             if k not in known}
    if extra:
      out["outputs"] = extra
    return out
  if command == "metadata":
    metadata = client.get_model_metadata()
    def describe(specs):
      return {alias: {"dtype": spec.dtype.name if spec.dtype else None,
                      "shape": _jsonable(spec.shape)}
              for alias, spec in specs.items()}

    signatures = {name: {"inputs": describe(metadata.inputs(name)),
                         "outputs": describe(metadata.outputs(name))}
                  for name in metadata.signature_defs}
    out = {"model_name": metadata.model_name,
           "model_version": metadata.model_version,
           "signatures": signatures}
    export = (client.export_metadata()
              if saved_model.METADATA_SIGNATURE in metadata.signature_defs
              else None)
    if export is not None:
      report = export.get("fit_report")
      out["fit_report"] = report
      per_output = (isinstance(report, dict) and "spearman" not in report
                    and all(isinstance(r, (dict, type(None)))
                            for r in report.values()))
      out["fit_summary"] = ({name: fit_summary(r)
                             for name, r in report.items()}
                            if per_output else fit_summary(report))
      out["export_metadata"] = export
    return out
  return {"model_version_status": [
      {"version": s.version, "state": s.state, "error_code": s.error_code,
       "error_message": s.error_message}
      for s in client.get_model_status()]}


def main(argv):
  """Runs the command in `argv` with the client FLAGS describe.

  Args:
    argv: the arguments left after flag parsing: at most one command
      (default "predict").

  Returns:
    The exit code: 0, or 1 when the server refused the request or
    `--input` or a flag value is bad (the error is written to stderr).

  Raises:
    app.UsageError: an unknown command, or a missing flag.
  """
  command = argv[1] if len(argv) > 1 else "predict"
  if command not in COMMANDS or len(argv) > 2:
    raise app.UsageError(f"Usage: dropvar_client [{'|'.join(COMMANDS)}] "
                         "--model_name=... [flags]")
  if not FLAGS.model_name:
    raise app.UsageError("--model_name is required.")
  cli_help.quiet_python_logs(FLAGS)
  inputs = None
  if command == "predict" and not FLAGS.input:
    raise app.UsageError("predict needs --input (.json, .npy or .npz).")
  # A retried connection is reported once, as UNAVAILABLE, not per retry.
  logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
  signature = FLAGS.signature
  try:
    if command == "predict":
      inputs, named = load_request(FLAGS.input)
      if named is not None:
        if FLAGS["signature"].present and named != FLAGS.signature:
          raise ValueError(
              f"--input {FLAGS.input} names signature {named!r} and "
              f"--signature is {FLAGS.signature!r}; pass one of them.")
        signature = named
    with client_lib.VariationClient(
        FLAGS.target, FLAGS.model_name, signature=signature,
        version=FLAGS.version, version_label=FLAGS.version_label,
        timeout=FLAGS.timeout, protocol=FLAGS.protocol) as client:
      out = run_command(command, client, inputs, FLAGS.output_filter)
  except errors.ServingError as e:
    print(str(e), file=sys.stderr)
    return 1
  except (OSError, ValueError) as e:
    # A bad --input file or flag value: one line, no traceback.
    print(f"dropvar_client: {e}", file=sys.stderr)
    return 1
  # The metadata is read by people: one key a line.
  print(json.dumps(out, indent=2 if command == "metadata" else None))
  return 0


def run_main():
  """Console entry point `dropvar_client`."""
  define_flags()
  cli_help.run(main, __name__, __doc__)


if __name__ == "__main__":
  run_main()
