"""The Beam metrics counters of the dropvar_tf pipelines.

Workers count in the namespace `NAMESPACE` ("examples_computed",
"examples_skipped", "duplicates_dropped", "examples_scored"); the launcher
sums them from the pipeline result with `totals`.
"""

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

NAMESPACE = "dropvar_tf"


def counter(name):
  """The Beam counter `name` in the dropvar_tf namespace (create in a DoFn)."""
  return Metrics.counter(NAMESPACE, name)


def totals(result):
  """Sums of the pipeline's dropvar_tf counters, by name.

  Args:
    result: the `PipelineResult` of a finished pipeline.

  Returns:
    dict {counter name: int}, committed values where the runner has them,
    else attempted ones.
  """
  out = {}
  query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  for count in query["counters"]:
    value = count.committed
    if value is None:
      value = count.attempted
    out[count.key.metric.name] = out.get(count.key.metric.name, 0) + (
        value or 0)
  return out
