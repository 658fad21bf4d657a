"""Tests for export/export_cli.py (the `dropvar_export` tool)."""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl import flags
import numpy as np

from dropvar_tf import contract
from dropvar_tf import heads
from dropvar_tf import saved_model
from dropvar_tf._keras import keras, tf
from dropvar_tf.export import export_cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_saved_dual(folder):
  """Saves a tiny dual model (add_variation_head) to `folder`/dual.keras."""
  keras.utils.set_random_seed(0)
  x = keras.Input(shape=(4,), name="features")
  h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
  h = keras.layers.Dropout(0.3, name="drop")(h)
  base = keras.Model(x, keras.layers.Dense(1, name="y")(h), name="base")
  dual = heads.add_variation_head(base)
  path = os.path.join(folder, "dual.keras")
  dual.save(path)
  return dual, path


def examples(n, seed=0):
  return np.random.RandomState(seed).randn(n, 4).astype("float32")


class ExportCliTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.folder = tempfile.mkdtemp()
    cls.dual, cls.model_path = make_saved_dual(cls.folder)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.folder, ignore_errors=True)
    super().tearDownClass()

  def flag_values(self, *args):
    values = flags.FlagValues()
    export_cli.define_flags(values)
    values(["dropvar_export"] + list(args))
    return values

  def fresh_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  def test_export_with_npz_warmup_matches_model(self):
    base = os.path.join(self.fresh_dir(), "dual")
    warmup = os.path.join(self.fresh_dir(), "warmup.npz")
    np.savez(warmup, features=examples(5))
    path = export_cli.export_from_flags(self.flag_values(
        f"--model={self.model_path}", f"--export_base={base}", "--version=3",
        f"--warmup={warmup}", "--mc_num_samples=8"))
    self.assertEqual(path, os.path.join(base, "3"))
    self.assertTrue(os.path.isfile(os.path.join(
        path, "assets.extra", "tf_serving_warmup_requests")))
    loaded = tf.saved_model.load(path)
    self.assertIn(contract.MC_DROPOUT_SIGNATURE, loaded.signatures)
    x = examples(7, seed=1)
    got = loaded.signatures[contract.SERVING_SIGNATURE](features=tf.constant(x))
    want = self.dual.predict(x, verbose=0)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(got[key], want[key], rtol=1e-5, atol=1e-6)
    meta = saved_model.read_export_metadata(path)
    self.assertEqual(meta["variation_head"],
                     heads.variation_head_metadata(self.dual))
    self.assertEqual(meta["warmup_requests"], 4)

  def test_jit_compile_flag_exports_an_xla_signature(self):
    base = os.path.join(self.fresh_dir(), "dual")
    path = export_cli.export_from_flags(self.flag_values(
        f"--model={self.model_path}", f"--export_base={base}",
        "--jit_compile"))
    self.assertTrue(saved_model.read_export_metadata(path)["jit_compile"])
    x = examples(3, seed=2)
    got = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE](
        features=tf.constant(x))
    want = self.dual.predict(x, verbose=0)
    for key in contract.OUTPUT_KEYS:
      self.assertAllClose(got[key], want[key], rtol=1e-5, atol=1e-6)

  def test_npy_and_positional_npz_warmup_give_an_array(self):
    folder = self.fresh_dir()
    x = examples(3)
    np.save(os.path.join(folder, "w.npy"), x)
    np.savez(os.path.join(folder, "w.npz"), x)
    for name in ("w.npy", "w.npz"):
      self.assertAllEqual(export_cli.load_warmup(os.path.join(folder, name)), x)
    with self.assertRaisesRegex(ValueError, "must be a .npy or .npz file"):
      bad = os.path.join(folder, "w.csv")
      open(bad, "w").close()
      export_cli.load_warmup(bad)

  def test_missing_files_and_flags_are_clear_errors(self):
    base = os.path.join(self.fresh_dir(), "dual")
    missing = os.path.join(self.fresh_dir(), "nope.keras")
    with self.assertRaisesRegex(FileNotFoundError,
                                f"--model file '{missing}' does not exist"):
      export_cli.export_from_flags(self.flag_values(
          f"--model={missing}", f"--export_base={base}"))
    with self.assertRaisesRegex(FileNotFoundError,
                                "--warmup file '/no/such.npz' does not exist"):
      export_cli.export_from_flags(self.flag_values(
          f"--model={self.model_path}", f"--export_base={base}",
          "--warmup=/no/such.npz"))
    with self.assertRaisesRegex(ValueError, "--export_base is required"):
      export_cli.export_from_flags(self.flag_values(
          f"--model={self.model_path}"))
    self.assertFalse(os.path.exists(base))

  def test_main_reports_errors_and_prints_the_path(self):
    base = os.path.join(self.fresh_dir(), "dual")
    values = self.flag_values(f"--model={self.model_path}",
                              f"--export_base={base}", "--version=0")
    err, out = io.StringIO(), io.StringIO()
    with mock.patch.object(export_cli, "FLAGS", values), \
        contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      self.assertEqual(export_cli.main(["dropvar_export"]), 1)
    self.assertIn("dropvar_export: error: Invalid value received for argument "
                  "`version`. Expected an integer >= 1. Received: version=0",
                  err.getvalue())
    self.assertEqual(out.getvalue(), "")
    values.version = None
    with mock.patch.object(export_cli, "FLAGS", values), \
        contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      self.assertEqual(export_cli.main(["dropvar_export"]), 0)
    self.assertEqual(out.getvalue(), os.path.join(base, "1") + "\n")
    self.assertIn("--model_base_path=" + os.path.abspath(base), err.getvalue())

  def test_file_system_errors_are_one_line(self):
    base = os.path.join(self.fresh_dir(), "dual")
    values = self.flag_values(f"--model={self.model_path}",
                              f"--export_base={base}")
    for error, message in [
        (tf.errors.ResourceExhaustedError(
            None, None, f"{base}/.tmp-1/variables; No space left on device\n"
            "\t[[{{node SaveV2}}]]"),
         f"dropvar_export: error: {base}/.tmp-1/variables; No space left on "
         "device\n"),
        (PermissionError(13, "Permission denied", base),
         f"dropvar_export: error: [Errno 13] Permission denied: '{base}'\n")]:
      with self.subTest(error=type(error).__name__):
        err, out = io.StringIO(), io.StringIO()
        with mock.patch.object(export_cli, "FLAGS", values), \
            mock.patch.object(saved_model, "export_saved_model",
                              side_effect=error), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
          self.assertEqual(export_cli.main(["dropvar_export"]), 1)
        self.assertEqual((err.getvalue(), out.getvalue()), (message, ""))

  def test_console_entry_point_in_a_subprocess(self):
    base = os.path.join(self.fresh_dir(), "dual")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = _REPO
    # As the console script runs: the package sees its command's name and
    # leaves its Keras layers to the launcher.
    command = [sys.executable, "-c",
               "import sys; sys.orig_argv = [sys.executable, "
               "'/venv/bin/dropvar_export'] + sys.argv[1:]; "
               "from dropvar_tf.cli_help import export_main; export_main()",
               f"--model={self.model_path}", f"--export_base={base}"]
    first = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    self.assertEqual(first.returncode, 0, first.stderr)
    # The export's serving check loads the version with TF's TF1 loader,
    # as TF Serving does, without TF's deprecation warning for it; neither
    # TF's start-up lines nor its INFO lines of the writes are printed.
    for noise in ("deprecated", "oneDNN", "Assets written", "Restoring"):
      self.assertNotIn(noise, first.stderr)
    self.assertEqual(first.stdout.strip().splitlines()[-1],
                     os.path.join(base, "1"))
    again = subprocess.run(command + ["--version=1"], env=env,
                           capture_output=True, text=True, timeout=300,
                           check=False)
    self.assertEqual(again.returncode, 1)
    self.assertIn("Version 1 already exists", again.stderr)
    self.assertEqual(saved_model.existing_versions(base), [1])


if __name__ == "__main__":
  tf.test.main()
