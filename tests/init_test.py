"""Tests for dropvar_tf/__init__.py: public names that load on first use."""

import importlib
import subprocess
import sys

import dropvar_tf as dv
from dropvar_tf._keras import tf


def _modules_after(code):
  """Which of tensorflow, keras, apache_beam a fresh process has loaded."""
  probe = (f"{code}\nimport sys\nprint(sorted(m for m in ('tensorflow', "
           f"'keras', 'apache_beam') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", probe], check=True,
                       capture_output=True, text=True).stdout
  return out.strip().splitlines()[-1]


class InitTest(tf.test.TestCase):

  def test_import_registers_the_keras_layers(self):
    # What `keras.saving.load_model` of a saved dual needs.
    self.assertEqual(_modules_after(
        "import dropvar_tf\nimport keras\n"
        "for name in ('ActivationStrength', 'VariationOutput', "
        "'SeededDropout'):\n"
        "  assert keras.saving.get_registered_object('dropvar_tf>' + name), "
        "name"), "['keras', 'tensorflow']")

  def test_own_module_runs_load_no_tensorflow(self):
    # As `python -m dropvar_tf.beam.targets_pipeline` starts.
    as_module = ("import sys\nsys.orig_argv = [sys.executable, '-m', "
                 "'dropvar_tf.beam.targets_pipeline', '--help']\n")
    self.assertEqual(_modules_after(as_module + "import dropvar_tf"), "[]")
    self.assertEqual(_modules_after(
        as_module + "import dropvar_tf as dv\n"
        "assert dv.VARIATION_KEY == 'variation'"), "[]")
    self.assertEqual(_modules_after(
        as_module + "import dropvar_tf as dv\ndv.add_variation_head"),
                     "['keras', 'tensorflow']")

  def test_which_command_lines_run_own_modules(self):
    python = sys.executable
    for argv, own in [
        ([python, "-m", "dropvar_tf.beam.scoring_pipeline", "--help"], True),
        ([python, "-O", "-mdropvar_tf.study.cli"], True),
        ([python, "-m", "pytest", "-m", "dropvar_tf.x"], False),
        ([python, "-m", "dropvar_tf_other.cli"], False),
        ([python, "-c", "import dropvar_tf"], False),
        ([python, "script.py", "-m", "dropvar_tf.x"], False),
        ([python], False),
        ([python, "/venv/bin/dropvar", "--quick"], True),
        ([python, "/venv/bin/dropvar_client", "predict"], True),
        ([python, "/venv/bin/dropvar_export", "--model=m.keras"], True),
        ([python, "/venv/bin/dropvar_model_server", "--port=1"], True),
        ([python, "/venv/bin/other_tool", "--x"], False),
    ]:
      self.assertEqual(dv._runs_own_module(argv), own, msg=argv)

  def test_every_public_name_is_its_module_object(self):
    for name in dv.__all__:
      value = getattr(dv, name)
      if name in dv._LAZY:
        module = importlib.import_module(dv._LAZY[name])
        self.assertIs(value, getattr(module, name), msg=name)
    self.assertIs(dv.mc_dropout_targets,
                  importlib.import_module("dropvar_tf.targets")
                  .mc_dropout_targets)
    from dropvar_tf import fit_variation_head  # From-imports resolve too.
    self.assertIs(fit_variation_head, dv.fit_variation_head)
    self.assertContainsSubset(set(dv.__all__), set(dir(dv)))

  def test_every_name_loads_without_the_study_dependencies(self):
    # As if they were not installed: importing any of them raises. Names
    # load their modules lazily, so each one is touched here.
    blocked = ("sklearn", "matplotlib", "tensorflow_datasets")
    self.assertEqual("['keras', 'tensorflow']", _modules_after(
        f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
        "import dropvar_tf as dv\n"
        "for name in dv.__all__:\n  getattr(dv, name)"))

  def test_unknown_name_is_an_attribute_error(self):
    with self.assertRaisesRegex(AttributeError, "has no attribute 'nope'"):
      dv.nope  # noqa: B018


if __name__ == "__main__":
  tf.test.main()
