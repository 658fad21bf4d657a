"""Runs one test file with pytest inside `bazel test` (the py_test main).

The project's tests are pytest-run `tf.test.TestCase` classes; running them
through pytest under Bazel too keeps one behaviour (collection, pytest.ini,
skips with reasons). Results go to Bazel's JUnit XML file.

Usage (what BUILD passes): pytest_runner.py tests/<name>_test.py
"""

import os
import sys

import pytest


def main(argv):
  args = ["-q", "-p", "no:cacheprovider"] + list(argv)
  xml = os.environ.get("XML_OUTPUT_FILE")
  if xml:
    args.append(f"--junitxml={xml}")
  return pytest.main(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
