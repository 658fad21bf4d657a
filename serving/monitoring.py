"""Prometheus monitoring as TF Serving's, plus the served variation.

`--monitoring_config_file` holds a text-format `MonitoringConfig`, the same
file `tensorflow_model_server` reads:

  prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }

and the page is served on the REST port (the message is declared in
`protos.py`: tensorflow-serving-api does not ship it).

Metrics, built on `prometheus_client` in a registry per server:

- `:tensorflow:serving:request_count{model_name, version, status}`: a
  counter of Predict requests by outcome (`status` is the gRPC code name,
  "OK", "INVALID_ARGUMENT", ...). TF Serving's has no `version` label.
- `:tensorflow:serving:request_latency{model_name, version, API,
  entrypoint}`: a histogram of the wall time of successful requests, in
  microseconds, with TF Serving's buckets (10 * 1.8^i); `entrypoint` is
  "GRPC" or "REST". TF Serving's has no `version` label.
- `:dropvar:serving:variation{model_name, version}`: a histogram of the
  served variation, one observation per example (the largest element of
  its "variation" output, or of its "variation/<name>" outputs for a dual of
  a multi-output model). This is the signal to alert on when inputs drift
  away from what the model knows.
- With a threshold (`--variation_threshold`):
  `:dropvar:serving:variation_examples{model_name, version}` and
  `:dropvar:serving:variation_examples_above_threshold{...}` count served
  examples and those whose variation exceeds the threshold, and the gauge
  `:dropvar:serving:variation_share_above_threshold{...}` is their ratio
  since the server started (a batch-1 request is one example).
- `:dropvar:serving:out_of_range{model_name, version}`: for a model with an
  "out_of_range" output (`add_variation_head(out_of_range=True)`), a
  histogram of it, one observation per example: the share of served inputs
  unlike the head's calibration inputs, whose variation is not to be
  trusted.

Counters keep TF Serving's exact names (no `_total` suffix), as its
exporter writes them, so dashboards built for it work on this server too.
"""

import threading

from google.protobuf import text_format
import numpy as np
import prometheus_client
from prometheus_client import utils as prometheus_utils

from dropvar_tf import contract
from dropvar_tf.serving import protos

DEFAULT_PATH = "/monitoring/prometheus/metrics"
_TF_SERVING = ":tensorflow:serving:"
_DROPVAR = ":dropvar:serving:"
# TF Serving's request_latency buckets: Buckets::Exponential(10, 1.8, 33).
_LATENCY_BUCKETS = tuple(10 * 1.8**i for i in range(32)) + (float("inf"),)
# Variation buckets: 1e-4 to about 100, doubling.
DEFAULT_VARIATION_BUCKETS = tuple(1e-4 * 2**i for i in range(21)) + (
    float("inf"),)
# Out-of-range buckets, in half-widths of the calibration range: 0 (in
# range), then 1/8 to 16384, doubling.
OUT_OF_RANGE_BUCKETS = (0.0,) + tuple(0.125 * 2**i for i in range(18)) + (
    float("inf"),)




def read_monitoring_config(path):
  """Reads a `--monitoring_config_file`.

  Args:
    path: a text-format `MonitoringConfig`.

  Returns:
    The Prometheus page's path, or None when `prometheus_config.enable` is
    false.

  Raises:
    ValueError: the file cannot be read or parsed, or the path does not
      start with "/".
  """
  config = protos.MonitoringConfig()
  try:
    with open(path) as f:
      text_format.Parse(f.read(), config)
  except (OSError, text_format.ParseError) as e:
    raise ValueError(
        f"Could not read monitoring config file {path}: {e}") from e
  prometheus = config.prometheus_config
  if not prometheus.enable:
    return None
  page = prometheus.path or DEFAULT_PATH
  if not page.startswith("/"):
    raise ValueError(
        "Invalid value received for `prometheus_config.path` in "
        f"{path}. Expected a path starting with '/'. Received: "
        f"path={page!r}")
  return page


def _escape(value):
  """A label value escaped for the Prometheus text format."""
  return (value.replace("\\", "\\\\").replace("\"", "\\\"")
          .replace("\n", "\\n"))


class _ExactNames:
  """Counters and gauges written under TF Serving's exact names.

  prometheus_client writes a counter family as `NAME_total` (in its TYPE
  line too); TF Serving's exporter writes `# TYPE NAME counter` and samples
  named NAME, so these are written here, in the same text format.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.values = {}  # (name, type, doc, labelnames) -> {labels: value}.

  def add(self, family, labels, amount=1.0):
    with self._lock:
      cells = self.values.setdefault(family, {})
      cells[labels] = cells.get(labels, 0.0) + amount

  def set(self, family, labels, value):
    with self._lock:
      self.values.setdefault(family, {})[labels] = value

  def render(self):
    with self._lock:
      snapshot = {f: dict(cells) for f, cells in self.values.items()}
    lines = []
    for (name, kind, doc, labelnames), cells in sorted(snapshot.items()):
      lines.append(f"# HELP {name} {doc}")
      lines.append(f"# TYPE {name} {kind}")
      for labels, value in sorted(cells.items()):
        pairs = ",".join(f'{k}="{_escape(v)}"'
                         for k, v in zip(labelnames, labels))
        lines.append(f"{name}{{{pairs}}} {value!r}")
    return "".join(line + "\n" for line in lines)


class _BatchHistogram:
  """A labelled Prometheus histogram that takes a batch of values at once.

  prometheus_client's histogram takes one value per call, under a lock,
  which costs per example on large batches. Buckets are
  counted here with numpy per batch and written as prometheus_client writes
  a histogram (`_bucket` with `le`, `_count`, `_sum`).
  """

  def __init__(self, name, doc, labelnames, buckets):
    self.name = name
    self.doc = doc
    self.labelnames = tuple(labelnames)
    bounds = [float(b) for b in buckets]
    if bounds[-1] != float("inf"):
      bounds.append(float("inf"))  # As prometheus_client adds it.
    self.bounds = np.asarray(bounds)
    self._lock = threading.Lock()
    self._cells = {}  # labels -> [per-bucket counts (not cumulative), sum].

  def observe(self, labels, values):
    """Adds `values` (a 1-D numpy array) to the histogram of `labels`."""
    # The first bound >= the value: Prometheus buckets are "less or equal".
    counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                         minlength=len(self.bounds))[:len(self.bounds)]
    total = float(np.sum(values))
    with self._lock:
      cell = self._cells.get(labels)
      if cell is None:
        cell = self._cells[labels] = [np.zeros(len(self.bounds), np.int64),
                                      0.0]
      cell[0] += counts
      cell[1] += total

  def render(self):
    with self._lock:
      snapshot = {labels: (counts.copy(), total)
                  for labels, (counts, total) in self._cells.items()}
    lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
    for labels, (counts, total) in sorted(snapshot.items()):
      pairs = ",".join(f'{k}="{_escape(v)}"'
                       for k, v in zip(self.labelnames, labels))
      for bound, cumulative in zip(self.bounds, np.cumsum(counts)):
        lines.append(f'{self.name}_bucket{{{pairs},le="'
                     f'{prometheus_utils.floatToGoString(bound)}"}} '
                     f"{float(cumulative)!r}")
      lines.append(f"{self.name}_count{{{pairs}}} {float(counts.sum())!r}")
      lines.append(f"{self.name}_sum{{{pairs}}} {total!r}")
    return "".join(line + "\n" for line in lines)


_REQUEST_COUNT = (_TF_SERVING + "request_count", "counter",
                  "The total number of requests.",
                  ("model_name", "version", "status"))
_EXAMPLES = (_DROPVAR + "variation_examples", "counter",
             "Served examples whose variation was observed.",
             ("model_name", "version"))
_ABOVE = (_DROPVAR + "variation_examples_above_threshold", "counter",
          "Served examples whose variation exceeded --variation_threshold.",
          ("model_name", "version"))
_SHARE = (_DROPVAR + "variation_share_above_threshold", "gauge",
          "Share of served examples whose variation exceeded "
          "--variation_threshold, since start.", ("model_name", "version"))


class Metrics:
  """The server's metrics and their Prometheus page. Thread-safe."""

  content_type = prometheus_client.CONTENT_TYPE_LATEST

  def __init__(self, variation_threshold=None,
               variation_buckets=DEFAULT_VARIATION_BUCKETS):
    """Creates the metrics in a registry of their own.

    Side effect: turns off prometheus_client's `_created` series for the
    process (TF Serving's exporter writes none).

    Args:
      variation_threshold: variation above which a served example counts in
        the share metrics; None exports no share.
      variation_buckets: upper bounds of the variation histogram's buckets.
    """
    prometheus_client.disable_created_metrics()
    self.variation_threshold = variation_threshold
    self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
    self._exact = _ExactNames()
    self._latency = prometheus_client.Histogram(
        _TF_SERVING + "request_latency",
        "Distribution of wall time (in microseconds) for Tensorflow Serving "
        "request.", ("model_name", "version", "API", "entrypoint"),
        buckets=_LATENCY_BUCKETS, registry=self.registry)
    self._variation = _BatchHistogram(
        _DROPVAR + "variation",
        "Distribution of the served variation, one observation per example.",
        ("model_name", "version"), variation_buckets)
    self._out_of_range = _BatchHistogram(
        _DROPVAR + "out_of_range",
        "Distribution of the served out_of_range signal (distance outside "
        "the head's calibration range), one observation per example.",
        ("model_name", "version"), OUT_OF_RANGE_BUCKETS)
    self._lock = threading.Lock()
    self._counts = {}  # (model, version) -> [examples, above].

  def observe_request(self, model, version, api, entrypoint, code, seconds):
    """Counts one request, and its latency when it succeeded.

    Args:
      model: the model name the request named.
      version: the version that answered, or None when none did.
      api: the API's name ("Predict", or the REST method).
      entrypoint: "GRPC" or "REST".
      code: the `grpc.StatusCode` it was answered with.
      seconds: its wall time.
    """
    version = "" if version is None else str(version)
    self._exact.add(_REQUEST_COUNT, (model, version, code.name))
    if code.name == "OK":
      self._latency.labels(model, version, api, entrypoint).observe(
          seconds * 1e6)

  def observe_outputs(self, model, version, outputs):
    """Records the variation (and out_of_range) of a served batch.

    Args:
      model: the model name.
      version: the version that answered.
      outputs: {output alias: numpy array}; without a "variation" output
        (or "variation/<name>" outputs of a multi-output dual) no variation
        is recorded, without "out_of_range" no out_of_range.
    """
    if contract.OUT_OF_RANGE_KEY in outputs:
      signal = np.asarray(outputs[contract.OUT_OF_RANGE_KEY], np.float64)
      self._out_of_range.observe((model, str(version)), signal.reshape(-1))
    variations = ([outputs[contract.VARIATION_KEY]]
                  if contract.VARIATION_KEY in outputs else
                  list(contract.per_output(outputs,
                                           contract.VARIATION_KEY).values()))
    if not variations:
      return
    # One value per example: the largest over the example's outputs (the
    # classes of a per-class statistic, and every output of a multi-output
    # dual).
    per_example = None
    for variation in variations:
      values = np.asarray(variation, dtype=np.float64)
      values = values.reshape(values.shape[0], -1).max(axis=1)
      per_example = (values if per_example is None
                     else np.maximum(per_example, values))
    labels = (model, str(version))
    self._variation.observe(labels, per_example)
    if self.variation_threshold is None:
      return
    above = int(np.sum(per_example > self.variation_threshold))
    with self._lock:
      counts = self._counts.setdefault(labels, [0, 0])
      counts[0] += len(per_example)
      counts[1] += above
      share = counts[1] / counts[0]
    self._exact.add(_EXAMPLES, labels, len(per_example))
    self._exact.add(_ABOVE, labels, above)
    self._exact.set(_SHARE, labels, share)

  def render(self):
    """The Prometheus text page."""
    return (self._exact.render() + self._variation.render() +
            self._out_of_range.render() +
            prometheus_client.generate_latest(self.registry).decode("utf-8"))
