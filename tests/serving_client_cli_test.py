"""Tests of serving/client_cli.py (the `dropvar_client` tool)."""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from unittest import mock

from absl import app
from absl import flags
import numpy as np

from dropvar_tf import metrics
from dropvar_tf import saved_model
from dropvar_tf._keras import tf
from dropvar_tf.serving import batching as batching_lib
from dropvar_tf.serving import client_cli
from dropvar_tf.serving import server as server_lib
import serving_testing as testing
import testing_models as tm

# The client asks for the signature's dtypes first (cast_inputs).
_NOT_FOUND = ("GetModelMetadata failed with NOT_FOUND: Servable not found "
              "for request: Latest(nope)")


def _flag_values(args):
  """Flags parsed from `args` as `dropvar_client` would; (values, argv)."""
  values = flags.FlagValues()
  client_cli.define_flags(values)
  remaining = values(["dropvar_client"] + list(args))
  return values, remaining


def _run_cli(args):
  """Runs `dropvar_client` with `args`; (exit code, stdout, stderr)."""
  values, remaining = _flag_values(args)
  stdout, stderr = io.StringIO(), io.StringIO()
  with mock.patch.object(client_cli, "FLAGS", values), \
       contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = client_cli.main(remaining)
  return code, stdout.getvalue(), stderr.getvalue()


class ClientCliTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.base = os.path.join(cls.tmp, "dense")
    cls.model = tm.dual_dense_model(seed=0)
    testing.write_export(cls.model, cls.base, 1)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _server(self):
    return server_lib.ModelServer(
        [server_lib.model_config("dense", self.base)], poll_seconds=0)

  def test_cli_predict_metadata_status(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    x = testing.dense_inputs(2, seed=6)
    json_path = os.path.join(tmp, "req.json")
    with open(json_path, "w") as f:
      json.dump({"inputs": {"x": x.tolist()}}, f)
    npy_path = os.path.join(tmp, "req.npy")
    np.save(npy_path, x)
    expected = self.model(x)
    with self._server() as server:
      common = [f"--target={server.target}", "--model_name=dense"]
      outputs = {}
      for name, args in [
          ("json", ["predict", f"--input={json_path}"]),
          ("npy", [f"--input={npy_path}", "--output_filter=variation"]),
          ("metadata", ["metadata"]),
          ("status", ["status"]),
      ]:
        code, stdout, _ = _run_cli(args + common)
        self.assertEqual(code, 0, name)
        outputs[name] = json.loads(stdout)
      code, stdout, stderr = _run_cli([f"--input={npy_path}",
                                       f"--target={server.target}",
                                       "--model_name=nope"])
      self.assertEqual((code, stdout, stderr), (1, "", _NOT_FOUND + "\n"))
    self.assertAllClose(outputs["json"]["prediction"], expected["prediction"],
                        rtol=1e-6, atol=1e-6)
    self.assertAllClose(outputs["json"]["variation"], expected["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertEqual(outputs["json"]["model_version"], 1)
    self.assertIsNone(outputs["npy"]["prediction"])
    self.assertAllClose(outputs["npy"]["variation"], expected["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertEqual(
        outputs["metadata"]["signatures"]["serving_default"]["inputs"]["x"],
        {"dtype": "float32", "shape": [-1, 4]})
    self.assertEqual(outputs["status"]["model_version_status"],
                     [{"version": 1, "state": "AVAILABLE", "error_code": 0,
                       "error_message": ""}])

  def test_cli_over_rest(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    x = testing.dense_inputs(2, seed=7)
    npy_path = os.path.join(tmp, "req.npy")
    np.save(npy_path, x)
    server = server_lib.ModelServer(
        [server_lib.model_config("dense", self.base)], poll_seconds=0,
        rest_api_port=0)
    with server:
      common = [f"--target=127.0.0.1:{server.rest_api_port}",
                "--model_name=dense", "--protocol=rest"]
      code, stdout, _ = _run_cli([f"--input={npy_path}"] + common)
      self.assertEqual(code, 0)
      code, status, _ = _run_cli(["status"] + common)
      self.assertEqual(code, 0)
      code, stdout_missing, stderr = _run_cli(
          [f"--input={npy_path}", f"--target=127.0.0.1:{server.rest_api_port}",
           "--model_name=nope", "--protocol=rest"])
    out = json.loads(stdout)
    self.assertAllClose(out["variation"], self.model(x)["variation"],
                        rtol=1e-6, atol=1e-6)
    self.assertIsNone(out["model_version"])
    self.assertEqual(json.loads(status)["model_version_status"][0]["state"],
                     "AVAILABLE")
    self.assertEqual((code, stdout_missing, stderr), (1, "", _NOT_FOUND + "\n"))

  def test_cli_metadata_shows_the_fit_report_over_grpc_and_rest(self):
    rng = np.random.RandomState(0)
    targets = rng.gamma(2.0, 0.05, size=64)
    report = metrics.fit_report(targets * rng.uniform(0.8, 1.2, size=64),
                                targets, num_samples=100)
    base = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "dense")
    saved_model.export_saved_model(self.model, base,
                                   metadata={"fit_report": report})
    batching = batching_lib.BatchingOptions(max_batch_size=8)
    server = server_lib.ModelServer(
        [server_lib.model_config("dense", base)], poll_seconds=0,
        rest_api_port=0, batching=batching)
    with server:
      runs = {
          "grpc": _run_cli(["metadata", f"--target={server.target}",
                            "--model_name=dense"]),
          "rest": _run_cli(["metadata",
                            f"--target=127.0.0.1:{server.rest_api_port}",
                            "--model_name=dense", "--protocol=rest"]),
      }
    summary = (f"On 64 held-out calibration inputs: Spearman "
               f"{report['spearman']:.3f} (bound "
               f"{report['noise_bound']['correlation']:.3f}), R^2 "
               f"{report['r2']:.3f}")
    for protocol, (code, stdout, stderr) in runs.items():
      with self.subTest(protocol):
        self.assertEqual((code, stderr), (0, ""))
        # Indented: one key a line.
        self.assertIn('\n  "fit_report": {\n', stdout)
        out = json.loads(stdout)
        self.assertEqual(out["fit_report"], report)
        self.assertEqual(out["export_metadata"]["fit_report"], report)
        self.assertEqual(out["export_metadata"]["model_name"],
                         self.model.name)
        self.assertStartsWith(out["fit_summary"], summary)
        self.assertIn("metadata", out["signatures"])

  def test_fit_summary_reads_the_report(self):
    report = {"num_examples": 160, "spearman": 0.5, "r2": None,
              "mean_ratio": 0.41,
              "noise_bound": {"correlation": 0.905, "r2": 0.82},
              "far_below_bound": ["held-out R^2 n/a is below 0.5 x the bound "
                                  "0.820"]}
    self.assertEqual(
        client_cli.fit_summary(report),
        "On 160 held-out calibration inputs: Spearman 0.500 (bound 0.905), "
        "R^2 n/a (bound 0.820), mean estimate / mean target 0.410. Far below "
        "the bound: held-out R^2 n/a is below 0.5 x the bound 0.820.")
    self.assertEqual(
        client_cli.fit_summary(None),
        "No fit report: the head was fitted without held-out inputs.")

  def test_metadata_of_a_model_not_exported_by_dropvar_has_no_report(self):
    with self._server() as server:
      code, stdout, _ = _run_cli(["metadata", f"--target={server.target}",
                                  "--model_name=dense"])
    self.assertEqual(code, 0)
    self.assertNotIn("fit_report", json.loads(stdout))

  def test_cli_reads_npz_and_list_json(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    npz_path = os.path.join(tmp, "req.npz")
    inputs = testing.ratings_inputs(2)
    np.savez(npz_path, **inputs)
    loaded = client_cli.load_inputs(npz_path)
    self.assertEqual(sorted(loaded), sorted(inputs))
    self.assertAllEqual(loaded["user_id"], inputs["user_id"])
    list_path = os.path.join(tmp, "req.json")
    with open(list_path, "w") as f:
      json.dump([[1.0, 2.0, 3.0, 4.0]], f)
    self.assertAllEqual(client_cli.load_inputs(list_path),
                        [[1.0, 2.0, 3.0, 4.0]])
    # TF Serving's row format: bare rows, or one object a row.
    with open(list_path, "w") as f:
      json.dump({"instances": [[1.0, 2.0], [3.0, 4.0]]}, f)
    self.assertAllEqual(client_cli.load_inputs(list_path),
                        [[1.0, 2.0], [3.0, 4.0]])
    with open(list_path, "w") as f:
      json.dump({"instances": [{"user_id": 3, "movie_id": 5},
                               {"user_id": 4, "movie_id": 6}]}, f)
    loaded = client_cli.load_inputs(list_path)
    self.assertAllEqual(loaded["user_id"], [3, 4])
    self.assertAllEqual(loaded["movie_id"], [5, 6])
    for body, message in [
        ({"instances": []}, "\"instances\" must be a non-empty list"),
        ({"rows": [1]}, "expected {\"inputs\": ...} (columns), "
         "{\"instances\": [...]} (rows"),
        ({"instances": [{"a": 1}, {"b": 2}]},
         "every instance must name the same inputs ['a']"),
        ([[1.0, 2.0], [3.0]], "rows of different lengths")]:
      with self.subTest(body=body):
        with open(list_path, "w") as f:
          json.dump(body, f)
        with self.assertRaisesRegex(ValueError, re.escape(message)):
          client_cli.load_inputs(list_path)

  def test_json_signature_name_and_b64_strings_are_read(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    x = testing.dense_inputs(2, seed=8)
    path = os.path.join(tmp, "req.json")
    with self._server() as server:
      common = [f"--target={server.target}", "--model_name=dense",
                f"--input={path}"]
      for signature, args, code, message in [
          ("serving_default", [], 0, ""),
          ("nope", [], 1, "GetModelMetadata failed with FAILED_PRECONDITION: "
           "Serving signature key \"nope\" not found."),
          ("nope", ["--signature=serving_default"], 1,
           f"dropvar_client: --input {path} names signature 'nope' and "
           "--signature is 'serving_default'; pass one of them.")]:
        with self.subTest(signature=signature, args=args):
          with open(path, "w") as f:
            json.dump({"signature_name": signature,
                       "inputs": {"x": x.tolist()}}, f)
          got = _run_cli(args + common)
          self.assertEqual(got[0], code)
          self.assertStartsWith(got[2], message)
          if code == 0:
            self.assertAllClose(json.loads(got[1])["variation"],
                                self.model(x)["variation"], rtol=1e-6,
                                atol=1e-6)
    with open(path, "w") as f:
      json.dump({"instances": [{"color": {"b64": "cmVk"}, "n": 1},
                               {"color": {"b64": "cGx1bQ=="}, "n": 2}]}, f)
    self.assertAllEqual(client_cli.load_inputs(path)["color"],
                        [b"red", b"plum"])
    # Bare rows of one bytes input, and one bytes value as the input.
    for body, want in [
        ({"instances": [{"b64": "cmVk"}, {"b64": "cGx1bQ=="}]},
         [b"red", b"plum"]),
        ({"inputs": {"b64": "cmVk"}}, b"red")]:
      with open(path, "w") as f:
        json.dump(body, f)
      self.assertAllEqual(client_cli.load_inputs(path), want)
    for value, message in [({"b64": "not base64!"}, "is not base64"),
                           ({"text": "red"}, "an object in a tensor must be")]:
      with open(path, "w") as f:
        json.dump({"inputs": {"color": [value]}}, f)
      with self.assertRaisesRegex(ValueError, message):
        client_cli.load_inputs(path)

  def test_object_arrays_are_refused_naming_the_file(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    path = os.path.join(tmp, "req.npz")
    np.savez(path, color=np.array(["red", None], dtype=object))
    with self.assertRaisesWithLiteralMatch(
        ValueError, f"{path}: array 'color' holds Python objects "
        "(dtype=object, e.g. strings from pandas), which are not read "
        "without pickle; save strings with a string dtype, e.g. "
        "np.asarray(column, dtype=str)."):
      client_cli.load_inputs(path)

  def test_a_bad_input_file_or_flag_is_one_line_on_stderr(self):
    tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
    broken = os.path.join(tmp, "broken.json")
    with open(broken, "w") as f:
      f.write('{"inputs": [[1.0, 2.0]')
    with self._server() as server:
      target = f"--target={server.target}"
      cases = [
          ([f"--input={broken}"], f"dropvar_client: {broken} is not valid "
           "JSON: "),
          ([f"--input={os.path.join(tmp, 'missing.npy')}"],
           "dropvar_client: [Errno 2] No such file or directory"),
          ([f"--input={os.path.join(tmp, 'x.txt')}"],
           "dropvar_client: --input must end in .json, .npy or .npz"),
          (["metadata", "--version=1", "--version_label=stable"],
           "dropvar_client: Invalid value received for argument "
           "`version_label`"),
      ]
      for args, message in cases:
        with self.subTest(args=args):
          code, stdout, stderr = _run_cli(
              args + [target, "--model_name=dense"])
          self.assertEqual(code, 1)
          self.assertEqual(stdout, "")
          self.assertStartsWith(stderr, message)
          self.assertLen(stderr.strip().splitlines(), 1)

  def test_usage_errors(self):
    cases = [
        (["bogus", "--model_name=m"],
         "Usage: dropvar_client [predict|metadata|status] --model_name=... "
         "[flags]"),
        (["status"], "--model_name is required."),
        (["predict", "--model_name=m"],
         "predict needs --input (.json, .npy or .npz)."),
    ]
    for args, message in cases:
      with self.subTest(message):
        with self.assertRaises(app.UsageError) as cm:
          _run_cli(args)
        self.assertEqual(str(cm.exception), message)

  def test_flags_keep_their_defaults(self):
    values, _ = _flag_values([])
    self.assertEqual(values.target, "localhost:8500")
    self.assertEqual(values.signature, "serving_default")
    self.assertEqual(values.timeout, 10.0)
    self.assertIsNone(values.model_name)


if __name__ == "__main__":
  tf.test.main()
