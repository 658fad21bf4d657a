"""Atomic file writes: a reader sees the old file, none, or the new one.

Every writer of results that a later run reads back (target chunks, study
caches, Beam manifests) goes through here, so a crash or a kill never leaves
a partial file under the final name.

  with atomic.atomic_path("/tmp/out.npz") as tmp:   # tmp ends in ".npz" too
    np.savez(tmp, values=values)
  atomic.atomic_write("/tmp/manifest.json", json.dumps(manifest))
"""

import contextlib
import os
import uuid

_WEIGHTS_SUFFIX = ".weights.h5"


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  The temporary name keeps `path`'s extension (Keras and numpy pick formats
  by it) and is unique per call, so concurrent writers of the same file never
  share one. If the block raises, the temporary file is removed and `path` is
  left as it was.

  Args:
    path: the final local file path.

  Yields:
    The temporary path to write.
  """
  head, tail = os.path.split(path)
  # Keras saves weights only to names ending in ".weights.h5".
  suffix = (_WEIGHTS_SUFFIX if tail.endswith(_WEIGHTS_SUFFIX)
            else os.path.splitext(tail)[1])
  tmp = os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex}{suffix}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path, data):
  """Writes `data` (bytes or str) to the local file `path` atomically."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
