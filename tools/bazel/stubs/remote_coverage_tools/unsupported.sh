#!/bin/sh
echo "bazel coverage is not supported offline (stand-in coverage tools)." >&2
exit 1
