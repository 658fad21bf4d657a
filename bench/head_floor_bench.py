"""The cost floor of a variation head, written in raw TensorFlow.

The same 3x256 MLP as `dual_bench.py`, with random weights, and the head
computations written directly as TF ops (no Keras layers): per-neuron
features (concatenated, or one matmul per layer summed), per-layer summaries
(mean, L2 norm, fraction active, with the library's ops) and a
two-statistic summary. Prints each
variant's forward time as a ratio of the plain MLP's, side by side in one run,
at batch 1 and 256: how close any implementation of these features can get
to the goals that `dual_bench.py` measures for the library's dual model.

  python bench/head_floor_bench.py
"""

import numpy as np
import tensorflow as tf

import dual_bench

_RNG = np.random.default_rng(0)
_SHAPES = [(64, 256), (256, 256), (256, 256), (256, 10)]
_W = [tf.constant(_RNG.normal(size=s).astype("float32") * 0.1) for s in _SHAPES]
_B = [tf.zeros(s[1]) for s in _SHAPES]


def _const(*shape):
  return tf.constant(_RNG.normal(size=shape).astype("float32"))


_HEAD_NEURONS = _const(768, 16)
_HEAD_SUMMARY = _const(9, 16)
_HEAD_SUMMARY2 = _const(6, 16)
_HEAD_HIDDEN = _const(16, 64)
_HEAD_OUT = _const(64, 1)


def _mlp(x):
  """The base model: returns (probabilities, [hidden activations])."""
  hidden = []
  for w, b in zip(_W[:3], _B[:3]):
    x = tf.nn.relu(tf.matmul(x, w) + b)
    hidden.append(x)
  return tf.nn.softmax(tf.matmul(x, _W[3]) + _B[3]), hidden


def _head(z, first):
  z = tf.nn.relu(tf.matmul(z, first))
  z = tf.nn.relu(tf.matmul(z, _HEAD_HIDDEN))
  return tf.exp(tf.matmul(z, _HEAD_OUT))


@tf.function
def base(x):
  return _mlp(x)[0]


@tf.function
def neurons(x):
  p, hidden = _mlp(x)
  return p, _head(tf.concat(hidden, -1), _HEAD_NEURONS)


@tf.function
def neurons_split(x):
  """Per-neuron features without the concat: one matmul per layer, summed."""
  p, hidden = _mlp(x)
  parts = [tf.matmul(h, _HEAD_NEURONS[256 * i:256 * (i + 1)])
           for i, h in enumerate(hidden)]
  z = tf.nn.relu(tf.add_n(parts))
  z = tf.nn.relu(tf.matmul(z, _HEAD_HIDDEN))
  return p, tf.exp(tf.matmul(z, _HEAD_OUT))


def _mean(t):
  return tf.reduce_mean(t, -1, keepdims=True)


@tf.function
def summary(x):
  p, hidden = _mlp(x)
  feats = []
  for h in hidden:
    feats += [_mean(h), tf.math.reduce_euclidean_norm(h, -1, True),
              _mean(tf.sign(h))]  # h >= 0: sign(h) is 1 where active
  return p, _head(tf.concat(feats, -1), _HEAD_SUMMARY)


@tf.function
def summary2(x):
  """Mean and L2 norm only: no fraction-active pass."""
  p, hidden = _mlp(x)
  feats = []
  for h in hidden:
    feats += [_mean(h), tf.math.reduce_euclidean_norm(h, -1, True)]
  return p, _head(tf.concat(feats, -1), _HEAD_SUMMARY2)


_FUNCTIONS = dict(base=base, neurons=neurons, neurons_split=neurons_split,
                  summary=summary, summary2=summary2)


def run(batch, repeats=15, inner=50):
  """Prints each variant's time as a ratio of the base model's, timed per
  call and as graph execution net of the empty loop (`dual_bench.in_graph`):
  medians of per-round paired ratios."""
  x = tf.constant(_RNG.normal(size=(batch, 64)).astype("float32"))
  _, ratios = dual_bench.time_interleaved(_FUNCTIONS, x, repeats, inner)
  passes = dual_bench.GRAPH_PASSES[batch]
  times, net, _ = dual_bench.time_in_graph(
      {name: fn.python_function for name, fn in _FUNCTIONS.items()}, x,
      passes, 11)
  base_ms = times["base"] * 1e3
  for label, r in (("call", ratios), ("graph", net)):
    print(f"batch {batch}, {label}: " + ", ".join(
        f"{name} {np.median(v):.2f}x" for name, v in r.items()
        if name != "base") + (f" (base {base_ms:.3f} ms, net of the empty "
                              "loop)" if label == "graph" else ""))


def main():
  for batch in (1, 256):
    run(batch)


if __name__ == "__main__":
  main()
