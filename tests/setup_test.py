"""Tests of the distribution: what a wheel holds, what the library imports."""

import os
import shutil
import subprocess
import sys
import zipfile

from dropvar_tf._keras import tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What setup.py reads to build: the package folders and its two files.
_SOURCES = ("setup.py", "README.md", "dropvar_tf", "serving", "export")
# Needed by the study only: the library's import path must not load them.
_STUDY_ONLY = ("sklearn", "matplotlib", "tensorflow_datasets")


class WheelTest(tf.test.TestCase):

  def test_wheel_holds_only_dropvar_tf(self):
    if not os.path.exists(os.path.join(_ROOT, "serving", "client.py")):
      self.skipTest("Needs the repository's layout (Bazel runfiles hold the "
                    "installed one).")
    src = os.path.join(self.get_temp_dir(), "src")
    for name in _SOURCES:
      path = os.path.join(_ROOT, name)
      if os.path.isdir(path):
        shutil.copytree(path, os.path.join(src, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
      else:
        os.makedirs(src, exist_ok=True)
        shutil.copy(path, src)
    dist = os.path.join(self.get_temp_dir(), "dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", dist, src],
        check=True, capture_output=True)
    (wheel,) = os.listdir(dist)
    with zipfile.ZipFile(os.path.join(dist, wheel)) as zf:
      names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    self.assertEqual({t for t in tops if not t.endswith(".dist-info")},
                     {"dropvar_tf"})
    for module in ("dropvar_tf/serving/client.py",
                   "dropvar_tf/serving/server.py",
                   "dropvar_tf/export/export_cli.py",
                   "dropvar_tf/study/demo.py"):
      self.assertIn(module, names)
    # Test fixtures stay out of the wheel.
    self.assertEmpty([n for n in names if "testing" in os.path.basename(n)])


class ImportTest(tf.test.TestCase):

  def test_library_imports_without_study_dependencies(self):
    # As if they were not installed: importing any of them raises.
    code = "\n".join([
        "import sys",
        f"sys.modules.update(dict.fromkeys({_STUDY_ONLY!r}))",
        "import dropvar_tf, dropvar_tf.serving.server",
        "import dropvar_tf.serving.client, dropvar_tf.export.export_cli",
        "print(sorted(m for m in sys.modules if m.startswith("
        "'dropvar_tf.study')))",
    ])
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    self.assertEqual(out.stdout.strip().splitlines()[-1], "[]")


if __name__ == "__main__":
  tf.test.main()
