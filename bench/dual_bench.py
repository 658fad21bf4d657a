"""Forward-time cost of the variation head, measured side by side.

Prints, at batch 1 and 256, on a 3x256 ReLU MLP with dropout 0.3:
  (a) dual model / base model forward time, for the default head (all layers,
      per-layer summaries), the per-neuron head and the head with moment
      propagation (goals: <= 1.25x with the all-layers per-neuron head,
      <= 1.10x with the summary head), in graph mode and with XLA;
  (b) MC dropout with T=100 passes / dual model (goal: >= 50x), with the T
      passes as one tiled batch and as T calls in one tf.function;
  (c) `mc_dropout_targets` on the batch / T plain compiled passes with Keras
      dropout on (goal: <= 1.3x); `targets_bench.py` measures it at larger N.
Every timed function but `mc_dropout_targets` (called as a user calls it)
is a compiled tf.function. The functions take turns in
rounds and each ratio is the median over rounds of the two times measured
side by side in that round (with its interquartile range), since these
machines are noisy.

  python bench/dual_bench.py [--quick] [--inter_op_parallelism=1]
"""

import argparse
import time

import numpy as np

from dropvar_tf._keras import keras, tf
from dropvar_tf import heads
from dropvar_tf import targets


def base_model(num_features=64, width=256, depth=3, classes=10, rate=0.3):
  inputs = keras.Input((num_features,), name="x")
  h = inputs
  for i in range(depth):
    h = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")(h)
    h = keras.layers.Dropout(rate, name=f"dropout_{i}")(h)
  outputs = keras.layers.Dense(classes, activation="softmax", name="out")(h)
  return keras.Model(inputs, outputs)


def compiled(model, xla=False):
  return tf.function(lambda x: model(x, training=False), jit_compile=xla)


def mc_compiled(model, num_samples, tiled=True, plain=False):
  """T stochastic passes: one tiled batch, or T calls in one tf.function.

  With seeded dropout masks (`targets.mc_dropout_model`), or with `plain`
  Keras dropout (`model(x, training=True)`).
  """
  mc = model if plain else targets.mc_dropout_model(model)

  @tf.function
  def tiled_fn(x):
    p = mc(tf.tile(x, [num_samples, 1]), training=plain)
    p = tf.reshape(p, [num_samples, -1, p.shape[-1]])
    return tf.math.reduce_std(p, axis=0)

  @tf.function
  def looped_fn(x):
    p = tf.stack([mc(x, training=plain) for _ in range(num_samples)])
    return tf.math.reduce_std(p, axis=0)
  return tiled_fn if tiled else looped_fn


def targets_call(model, num_samples, batch):
  """`mc_dropout_targets` on the batch, as a user calls it."""
  return lambda x: targets.mc_dropout_targets(
      model, x.numpy(), num_samples=num_samples, batch_size=batch,
      progress=False)


def time_interleaved(fns, x, repeats, inner):
  """Times every fn in rounds; returns ({name: median s/call}, ratios).

  `ratios[name]` holds, per round, the fn's time over the first fn's time in
  the same round: adjacent in time, so the machine's drift cancels out.
  """
  for fn in fns.values():
    for _ in range(3):
      fn(x)  # trace and warm up
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(inner):
        out = fn(x)
      tf.nest.map_structure(np.asarray, out)
      samples[name].append((time.perf_counter() - start) / inner)
  first = np.asarray(samples[next(iter(fns))])
  ratios = {name: np.asarray(v) / first for name, v in samples.items()}
  return {name: float(np.median(v)) for name, v in samples.items()}, ratios


def ratio_text(ratios):
  """Median paired ratio with its interquartile range."""
  q1, med, q3 = np.percentile(ratios, [25, 50, 75])
  return f"{med:.2f}x base (IQR {q1:.2f}-{q3:.2f})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--num_samples", type=int, default=100)
  parser.add_argument(
      "--inter_op_parallelism", type=int, default=0,
      help="TF inter-op threads (0: TF's choice). 1 runs independent ops one "
      "at a time, as `dropvar_model_server "
      "--tensorflow_inter_op_parallelism=1` does.")
  args = parser.parse_args()
  tf.config.threading.set_inter_op_parallelism_threads(
      args.inter_op_parallelism)
  repeats, inner = (5, 20) if args.quick else (15, 50)
  keras.utils.set_random_seed(0)
  base = base_model()
  variants = {
      "head, all layers, summary (default)": heads.add_variation_head(base),
      "head, all layers, neurons": heads.add_variation_head(
          base, features="neurons"),
      "head + moment propagation": heads.add_variation_head(
          base, include_moments=True),
  }
  print(f"base: 3x256 MLP; T={args.num_samples}; repeats={repeats}x{inner}; "
        "inter-op threads "
        f"{tf.config.threading.get_inter_op_parallelism_threads()} "
        "(0: TF's choice)")
  for batch in (1, 256):
    x = tf.constant(np.random.default_rng(0).normal(
        size=(batch, 64)).astype("float32"))
    default = next(iter(variants))
    fns = {"base": compiled(base)}
    fns.update({name: compiled(m) for name, m in variants.items()})
    fns["base, XLA"] = compiled(base, xla=True)
    fns["default, XLA"] = compiled(variants[default], xla=True)
    fns["mc tiled"] = mc_compiled(base, args.num_samples)
    fns["mc looped"] = mc_compiled(base, args.num_samples, tiled=False)
    fns["plain passes"] = mc_compiled(base, args.num_samples, tiled=False,
                                      plain=True)
    fns["targets"] = targets_call(base, args.num_samples, batch)
    t, ratios = time_interleaved(fns, x, repeats, inner)
    print(f"\nbatch {batch}: base {t['base'] * 1e3:.3f} ms")
    for name in variants:
      print(f"  (a) {name}: {t[name] * 1e3:.3f} ms = "
            f"{ratio_text(ratios[name])}")
    xla = ratios["default, XLA"] / ratios["base, XLA"]
    print(f"  (a) XLA: default dual {t['default, XLA'] * 1e3:.3f} ms / base "
          f"{t['base, XLA'] * 1e3:.3f} ms = {ratio_text(xla)}")
    for kind in ("tiled", "looped"):
      mc = t[f"mc {kind}"]
      paired = np.median(ratios[f"mc {kind}"] / ratios[default])
      print(f"  (b) MC dropout T={args.num_samples}, {kind}: "
            f"{mc * 1e3:.3f} ms = {paired:.1f}x the default dual")
    paired = ratios["targets"] / ratios["plain passes"]
    q1, med, q3 = np.percentile(paired, [25, 50, 75])
    print(f"  (c) mc_dropout_targets {t['targets'] * 1e3:.3f} ms / "
          f"{args.num_samples} plain compiled passes "
          f"{t['plain passes'] * 1e3:.3f} ms = {med:.2f}x "
          f"(IQR {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
  main()
