#!/bin/bash
# The Python interpreter of the Bazel toolchain: the project's venv, so that
# tests see TensorFlow and the other packages installed there.
# DROPVAR_PYTHON overrides it (e.g. .venv-beam/bin/python for the Beam tests;
# .bazelrc passes it through to tests).
set -euo pipefail
if [[ -n "${DROPVAR_PYTHON:-}" ]]; then
  exec "${DROPVAR_PYTHON}" "$@"
fi
# This file reaches the test through runfiles symlinks: resolve them to find
# the source tree, and the venv in it.
self="$(readlink -f "${BASH_SOURCE[0]}")"
root="$(cd "$(dirname "${self}")/../.." && pwd)"
if [[ ! -x "${root}/.venv/bin/python" ]]; then
  echo "No venv at ${root}/.venv: run .ci/setup (or set DROPVAR_PYTHON)." >&2
  exit 1
fi
exec "${root}/.venv/bin/python" "$@"
