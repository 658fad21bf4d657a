"""Files of the Beam pipelines on any Beam file system (local, gs://, ...).

Local paths go through `dropvar_tf.atomic`, the one atomic write of the
library; only paths on other Beam file systems take the temporary name and
rename of Beam's `FileSystems` here.
"""

import uuid

from apache_beam.io.filesystems import FileSystems

from dropvar_tf import atomic


def is_local(path):
  """Whether `path` is on the local file system (no scheme, or file://)."""
  return FileSystems.get_scheme(path) in (None, "file")


def read_file_bytes(path):
  """The bytes of the file `path`, on any Beam file system."""
  with FileSystems.open(path) as f:
    return f.read()


def atomic_write(path, data):
  """Writes `data` to `path` via a unique temporary name and a rename.

  A reader never sees a partial file: it sees the old file, none, or the new
  one. Rewriting the same bytes (a retried shard) is harmless. Local paths
  use `dropvar_tf.atomic.atomic_write` (the temporary file is a hidden file
  beside `path`, with its extension); other file systems write
  `<path>.tmp-<hex>` and rename it, replacing an existing `path`.

  Args:
    path: the final path, on any Beam file system.
    data: the file's bytes.
  """
  if is_local(path):
    atomic.atomic_write(path, data)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  try:
    with FileSystems.create(tmp) as f:
      f.write(data)
    if FileSystems.exists(path):
      FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
  finally:
    if FileSystems.exists(tmp):
      FileSystems.delete([tmp])
