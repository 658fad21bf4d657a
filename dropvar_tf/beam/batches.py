"""Work items: input examples in fixed batches by key rank, not by bundle.

A runner cuts a PCollection into bundles as it likes (per file, per byte
range, per worker). Batching within bundles (`BatchElements`) leaves a short
last batch in every bundle, and padding those to the compiled batch size
wastes compute that grows with the number of bundles. Here every example
gets its batch from its key instead:

    raw examples
      -> (key, raw), the keys of an earlier run's parts dropped (skipped)
      -> every remaining key, sorted (one small side input: 8 bytes a key)
      -> batch = rank of the key // rows
      -> GroupByKey(batch): (batch, [(key, raw), ...]) of exactly `rows`
         examples, sorted by key, the last batch of the run shorter

So only the run's last batch is short, whatever the bundling, the file
layout or the runner; and a batch's examples depend only on the keys (the
same batches in every run with the same inputs and done keys). An example
delivered twice (same key) joins its twin's batch.
"""

import apache_beam as beam
import numpy as np

from dropvar_tf.beam import counters
from dropvar_tf.beam import parts
from dropvar_tf.beam import progress
from dropvar_tf.beam import records

# Raw examples whose keys are parsed in one call.
KEY_BATCH = 1024


def raw_keys(batch, input_format, key_feature):
  """(B,) int64 keys of raw elements (serialized Examples or (key, row))."""
  if input_format == "tfrecord":
    # Only the key feature: the inputs are parsed once, when computed.
    keys, _ = records.parse_examples(list(batch), {"kind": "dict",
                                                   "inputs": []},
                                     key_feature)
    return np.asarray(keys, np.int64)
  return np.array([k for k, _ in batch], np.int64)


class KeyTodoFn(beam.DoFn):
  """Batch of raw elements -> (keys, raws) of those whose key is not done.

  Counts the others as "examples_skipped".
  """

  def __init__(self, input_format, key_feature):
    self._input_format = input_format
    self._key_feature = key_feature
    self._skipped = counters.counter("examples_skipped")

  def process(self, batch, done_keys):
    batch = list(batch)
    keys = raw_keys(batch, self._input_format, self._key_feature)
    todo = ~np.isin(keys, done_keys)
    skipped = len(batch) - int(todo.sum())
    if skipped:
      self._skipped.inc(skipped)
      progress.add("skipped", skipped)
    if todo.any():
      yield keys[todo], [raw for raw, keep in zip(batch, todo) if keep]


def _assign(keyed, todo_keys, rows):
  """(keys, raws) -> (batch id, (keys, raws)) for each batch they reach.

  One element per batch and input batch, not per example: the shuffle then
  moves a few large elements.
  """
  keys, raws = keyed
  ids = np.searchsorted(todo_keys, keys) // rows
  for batch_id in np.unique(ids):
    where = np.flatnonzero(ids == batch_id)
    yield int(batch_id), (keys[where], [raws[i] for i in where])


def _merge(item):
  """(batch id, [(keys, raws), ...]) -> (batch id, [(key, raw), ...])."""
  batch_id, pieces = item
  return batch_id, sorted(
      ((int(key), raw) for keys, raws in pieces
       for key, raw in zip(keys, raws)), key=lambda kv: kv[0])


def work_items(examples, input_format, key_feature, done_keys, rows,
               label="Work"):
  """PCollection of (batch id, [(key, raw), ...]) of `rows` examples each.

  Args:
    examples: raw examples (`sources.read_examples`).
    input_format: "tfrecord" or "npz".
    key_feature: name of the int64 key feature.
    done_keys: a one-element PCollection of the sorted keys to skip
      (`parts.done_parts`).
    rows: examples per batch.
    label: prefix of the step names.

  Returns:
    One element per batch: its id (the rank of its first key // rows) and
    its examples with their keys, sorted by key. Every batch has
    `rows` examples (more only with duplicated keys), the last one fewer.
  """
  keyed = (examples
           | f"{label}KeyBatches" >> beam.BatchElements(
               min_batch_size=KEY_BATCH, max_batch_size=KEY_BATCH)
           | f"{label}Todo" >> beam.ParDo(KeyTodoFn(input_format,
                                                     key_feature),
                                          beam.pvalue.AsSingleton(done_keys)))
  todo_keys = (keyed
               | f"{label}TodoKeys" >> beam.Map(lambda kr: kr[0])
               | f"{label}SortedKeys" >> beam.CombineGlobally(
                   parts.ConcatKeysFn()))
  return (keyed
          | f"{label}Assign" >> beam.FlatMap(
              _assign, beam.pvalue.AsSingleton(todo_keys), rows)
          | f"{label}Group" >> beam.GroupByKey()
          | f"{label}Merge" >> beam.Map(_merge))
