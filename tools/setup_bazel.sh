#!/usr/bin/env bash
# Sets up `bazel test //...` for dropvar_tf, offline:
#   * installs Debian's bazel-bootstrap (Bazel 4.2.3) when `bazel` is missing
#     (apt needs a package mirror; nothing else is downloaded: WORKSPACE
#     points Bazel's rules_cc / rules_java / remote_coverage_tools at local
#     stand-ins under tools/bazel/stubs);
#   * checks the Python the tests run with: .venv/bin/python (made by
#     .ci/setup), or the interpreter given with --python, which is then
#     written to .bazelrc.user (passed to tests as DROPVAR_PYTHON);
#   * checks that BUILD matches the sources (tools/check_build.py).
#
# Usage:
#   tools/setup_bazel.sh                      # then: bazel test //...
#   tools/setup_bazel.sh --python /path/to/venv/bin/python
#   DROPVAR_PYTHON=$PWD/.venv-beam/bin/python bazel test //:beam_targets_pipeline_test
set -euo pipefail
cd "$(dirname "$0")/.."

python_override=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) python_override="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "Unknown argument: $1" >&2; exit 2 ;;
  esac
done

if ! command -v bazel >/dev/null 2>&1; then
  echo "== installing bazel-bootstrap (Bazel 4.2.3) =="
  sudo_cmd=""
  if [[ "$(id -u)" != 0 ]]; then sudo_cmd="sudo"; fi
  ${sudo_cmd} apt-get update -q
  DEBIAN_FRONTEND=noninteractive ${sudo_cmd} apt-get install -y -q \
    bazel-bootstrap
fi
echo "bazel: $(bazel --version 2>/dev/null || echo unknown) at $(command -v bazel)"

if [[ -n "${python_override}" ]]; then
  python="$(readlink -f "${python_override}")"
  printf '# Written by tools/setup_bazel.sh.\ntest --test_env=DROPVAR_PYTHON=%s\n' \
    "${python}" > .bazelrc.user
  echo "Wrote .bazelrc.user: tests run with ${python}"
else
  python="${PWD}/.venv/bin/python"
  if [[ ! -x "${python}" ]]; then
    echo "No ${python}: run .ci/setup first (or pass --python)." >&2
    exit 1
  fi
fi
"${python}" -c "import tensorflow, pytest" \
  || { echo "${python} lacks tensorflow or pytest." >&2; exit 1; }
echo "python: ${python} ($("${python}" --version 2>&1))"

"${python}" tools/check_build.py
echo "Ready: bazel test //...   (one test file: bazel test //:targets_test)"
