"""A progress line for pipelines whose workers run in the launcher process.

With the DirectRunner in memory (the default), every DoFn runs in the
process that launched the pipeline, so workers can update one line on its
stderr as they finish work. Other runners report through the Beam counters
(`dropvar_tf.beam.counters`) instead, which every runner shows.

    progress.start("targets")
    ...                     # workers: progress.add("computed", 2048)
    progress.finish()       # ends the line
"""

import sys
import threading

_LOCK = threading.Lock()
# The launcher's tally: one per process, shared by its in-process workers.
_STATE = {"label": None, "counts": {}, "stream": None}


def start(label, stream=None):
  """Starts a progress line `label: ...` on `stream` (default stderr).

  Side effects: resets the process's tally; `add` writes to `stream` until
  `finish`.
  """
  with _LOCK:
    _STATE.update(label=label, counts={}, stream=stream or sys.stderr)


def add(name, count):
  """Adds `count` to the tally `name` and rewrites the line (if started).

  Workers call it; it does nothing in a process that did not `start` (a
  worker process of another runner).
  """
  with _LOCK:
    stream = _STATE["stream"]
    if stream is None:
      return
    counts = _STATE["counts"]
    counts[name] = counts.get(name, 0) + int(count)
    parts = ", ".join(f"{value:,} {key}" for key, value in counts.items())
    stream.write(f"\r{_STATE['label']}: {parts}")
    stream.flush()


def finish():
  """Ends the line (a newline when anything was written) and stops."""
  with _LOCK:
    stream = _STATE["stream"]
    if stream is not None and _STATE["counts"]:
      stream.write("\n")
      stream.flush()
    _STATE.update(label=None, counts={}, stream=None)
