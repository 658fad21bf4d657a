"""Resumable target files: one manifest and one chunk file per chunk.

`targets.mc_dropout_targets(..., output_path=path)` keeps its results here,
so an interrupted run only recomputes the chunks it had not written:

    path/manifest.json        the run's settings (JSON, sorted keys)
    path/chunk_000000.npz     values, start, stop, input_digest, digest
    path/chunk_000001.npz     ...

A chunk file holds the targets of examples [start, stop). Its `digest` is a
sha256 of the settings, its range, the digest of its inputs and its values,
so a truncated, corrupted or foreign file is recomputed, never used. Every
file is written atomically (`dropvar_tf.atomic`): a reader sees the old file,
none, or the new one.

Example:

```python
chunk_rows, digest = prepare_output(path, settings)
write_chunk(path, 0, digest, 0, 8, input_digest(x[:8], keys[:8]), values)
values, stored_input_digest = read_chunk(path, 0, digest, 0, 8)
```
"""

import hashlib
import json
import os

import numpy as np

from dropvar_tf import atomic
from dropvar_tf import validation
from dropvar_tf._keras import tf

MANIFEST_FILENAME = "manifest.json"
# Stored in the manifest: a directory of another format is refused. 2: the
# model fingerprint covers the architecture, not only the weights.
FORMAT_VERSION = 2


def chunk_path(output_path, index):
  """The file of chunk `index` in `output_path`."""
  return os.path.join(output_path, f"chunk_{index:06d}.npz")


def hash_structure(digest, x):
  """Feeds names, shapes, dtypes and bytes of every array of `x`.

  Args:
    digest: a `hashlib` hash object, updated in place.
    x: an array, or a nested structure of arrays (`tf.nest`); a top-level
      dict is fed by sorted key, with the keys as names.
  """
  if isinstance(x, dict):
    items = sorted(x.items())
  else:
    items = list(enumerate(tf.nest.flatten(x)))
  for name, item in items:
    value = np.ascontiguousarray(item)
    digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())


def input_digest(x, keys):
  """sha256 (hex) of a chunk's inputs `x` and its int64 example `keys`."""
  digest = hashlib.sha256()
  hash_structure(digest, x)
  digest.update(np.ascontiguousarray(keys, np.int64).tobytes())
  return digest.hexdigest()


def _chunk_digest(settings_digest, start, stop, inputs_digest, values):
  digest = hashlib.sha256(settings_digest.encode())
  digest.update(f"|{start}|{stop}|{inputs_digest}|".encode())
  values = np.ascontiguousarray(values)
  digest.update(f"{values.dtype.str}|{values.shape}|".encode())
  digest.update(values.tobytes())
  return digest.hexdigest()


def write_chunk(output_path, index, settings_digest, start, stop,
                inputs_digest, values):
  """Writes the targets of examples [start, stop) as chunk `index`.

  Side effect: replaces `chunk_path(output_path, index)` atomically.

  Args:
    output_path: the run's directory (made by `prepare_output`).
    index: integer, the chunk's position in the run.
    settings_digest: the digest `prepare_output` returned.
    start, stop: the chunk's example range.
    inputs_digest: `input_digest` of the chunk's inputs and keys.
    values: the chunk's targets, a numpy array.
  """
  digest = _chunk_digest(settings_digest, start, stop, inputs_digest, values)
  with atomic.atomic_path(chunk_path(output_path, index)) as tmp:
    np.savez(tmp, values=values, start=start, stop=stop,
             input_digest=np.array(inputs_digest), digest=np.array(digest))


def read_chunk(output_path, index, settings_digest, start, stop):
  """Reads chunk `index` back if it is valid for these settings and range.

  Args:
    output_path: the run's directory.
    index: integer, the chunk's position in the run.
    settings_digest: the digest `prepare_output` returned.
    start, stop: the example range the chunk must cover.

  Returns:
    (values, input_digest) of a valid chunk file; None when the file is
    missing, unreadable, of another range, or fails its digest.
  """
  path = chunk_path(output_path, index)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      values = data["values"]
      inputs_digest = str(data["input_digest"])
      digest = str(data["digest"])
      if int(data["start"]) != start or int(data["stop"]) != stop:
        return None
  except Exception:
    # Truncated or corrupted files raise many error types (zip, npy, EOF);
    # any of them means "recompute", never "use".
    return None
  if digest != _chunk_digest(settings_digest, start, stop, inputs_digest,
                             values):
    return None
  return values, inputs_digest


def prepare_output(output_path, settings):
  """Writes the manifest of a new run, or checks that of a resumed one.

  Side effects: creates `output_path` if needed; writes `manifest.json`
  (atomically) when there is none or it cannot be parsed.

  Args:
    output_path: the run's directory.
    settings: JSON-serializable dict of everything the targets depend on,
      with "chunk_rows" (examples per chunk file). A resumed run keeps the
      stored "chunk_rows"; every other entry must match.

  Returns:
    (chunk_rows, settings digest): the digest to pass to `write_chunk` and
    `read_chunk`.

  Raises:
    ValueError: `output_path` was written with other settings (the first
      one that differs is named).
  """
  os.makedirs(output_path, exist_ok=True)
  manifest_path = os.path.join(output_path, MANIFEST_FILENAME)
  stored = None
  if os.path.exists(manifest_path):
    try:
      with open(manifest_path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = None  # A torn manifest is rewritten; chunks are re-verified.
  if stored is not None:
    for name, value in settings.items():
      if name == "chunk_rows":
        continue
      if stored.get(name) != value:
        raise validation.invalid(
            "output_path", f"a resume directory written with the same "
            f"settings; its `{name}` is {stored.get(name)!r}, this run's is "
            f"{value!r}", output_path)
    settings = dict(settings, chunk_rows=stored["chunk_rows"])
  else:
    atomic.atomic_write(manifest_path,
                        json.dumps(settings, indent=2, sort_keys=True))
  digest = hashlib.sha256(
      json.dumps(settings, sort_keys=True).encode()).hexdigest()
  return settings["chunk_rows"], digest
