"""Forward-time cost of the variation head, measured side by side.

Prints, at batch 1 and 256, for a 3x256 ReLU MLP with dropout 0.3 (or, with
`--model`, one of the reference models of the paper's three task kinds):
  (a) dual model / base model forward time, for the default head (all layers,
      per-layer summaries), the per-neuron head and the head with moment
      propagation (goals: <= 1.25x with the all-layers per-neuron head,
      <= 1.10x with the summary head), timed two ways:
        call:  one compiled tf.function call per pass, as a Python caller
               sees it (about 0.25 ms of call overhead on both sides);
        graph: 200 passes (10 at batch 256) in one tf.while_loop, net of
               the empty loop's time: the graph's own execution, a lower
               bound on what a C++ server such as TF Serving pays per
               request (it adds Session::Run and RPC costs); in graph mode,
               and with XLA (`jit_compile=True`, one launch per pass);
  (b) MC dropout with T=100 passes / dual model (goal: >= 50x), with the T
      passes as one tiled batch and as T calls in one tf.function; and the
      bound no one-pass method can pass in the same execution mode: tiled
      MC / the base model alone;
  (c) `mc_dropout_targets` on the batch / T plain compiled passes with Keras
      dropout on (goal: <= 1.3x); `targets_bench.py` measures it at larger N.
The functions take turns in rounds and each ratio is the median over rounds
of the two times measured side by side in that round (with its interquartile
range), since these machines are noisy.

  python bench/dual_bench.py [--quick] [--inter_op_parallelism=1]
      [--model=mlp|movielens|criteo|cnn]
"""

import argparse
import time

import numpy as np

from dropvar_tf._keras import keras, tf
from dropvar_tf import heads
from dropvar_tf import seeded_dropout
from dropvar_tf import targets
from dropvar_tf.study.models import reference

# Passes per timed graph call, by batch size.
GRAPH_PASSES = {1: 200, 256: 10}


def base_model(num_features=64, width=256, depth=3, classes=10, rate=0.3):
  inputs = keras.Input((num_features,), name="x")
  h = inputs
  for i in range(depth):
    h = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")(h)
    h = keras.layers.Dropout(rate, name=f"dropout_{i}")(h)
  outputs = keras.layers.Dense(classes, activation="softmax", name="out")(h)
  return keras.Model(inputs, outputs)


# name: (description, model builder, input maker(batch, rng)). Weights are
# random: the time of a forward pass does not depend on them.
MODELS = {
    "mlp": ("3x256 MLP, 64 features, softmax over 10", base_model,
            lambda n, rng: rng.normal(size=(n, 64)).astype("float32")),
    "movielens": (
        "MovieLens-100k reference: 2 embeddings of 32, MLP 128-64, rating",
        lambda: reference.movielens_model(944, 1683, seed=0),
        lambda n, rng: {"user_id": rng.integers(0, 944, n),
                        "movie_id": rng.integers(0, 1683, n)}),
    "criteo": (
        "Criteo reference: 13 dense + 26 embedded ids, MLP 256-128, sigmoid",
        lambda: reference.criteo_model(1000, seed=0),
        lambda n, rng: {"dense": rng.normal(size=(n, 13)).astype("float32"),
                        "cat": rng.integers(0, 1000, (n, 26))}),
    "cnn": (
        "EMNIST reference CNN: 28x28 conv 32-64, dense 128, softmax over 47",
        lambda: reference.image_cnn((28, 28, 1), 47, seed=0),
        lambda n, rng: rng.random((n, 28, 28, 1)).astype("float32")),
}


def compiled(model, xla=False):
  return tf.function(lambda x: model(x, training=False), jit_compile=xla)


def _through(t, zero):
  """`t`, read through the loop counter `zero` (0) so it is not hoisted."""
  if t.dtype == tf.string:  # no arithmetic on strings: roll by 0 rows
    return tf.roll(t, shift=zero, axis=0)
  return t + tf.cast(zero, t.dtype)


def _total(t):
  """The sum of `t` (of its strings' lengths): one number the pass feeds."""
  if t.dtype == tf.string:
    return tf.reduce_sum(tf.strings.length(t))
  return tf.reduce_sum(t)


def in_graph(forward, passes):
  """`passes` calls of `forward(x)` in one tf.while_loop: no call overhead.

  Each pass reads the input through `minimum(i, 0)` (zero, unknown to the
  graph optimizer; string inputs are rolled by it) and all of its outputs
  are summed, so no pass can be hoisted out of the loop, merged or cut
  short. The loop's own ops cost a few microseconds a pass: `main` times an
  empty loop and subtracts it.
  `forward` may be an XLA-compiled function: it then runs as one XLA
  launch per pass, as in a server that gets one request per pass.
  """

  def fn(x):
    def body(i, acc):
      zero = tf.minimum(i, 0)
      xi = tf.nest.map_structure(lambda t: _through(t, zero), x)
      out = tf.nest.flatten(forward(xi))
      return i + 1, acc + tf.add_n(
          [tf.cast(_total(o), tf.float32) for o in out])
    return tf.while_loop(lambda i, _: i < passes, body, (0, 0.0),
                         parallel_iterations=1)[1]
  return tf.function(fn)


def time_in_graph(forwards, x, passes, repeats):
  """Times each of `forwards` (one named "base") as `passes` passes in one
  graph loop (`in_graph`), in interleaved rounds, net of the empty loop.

  Returns:
    ({name: median s per pass}, {name: per-round ratios (t - t_loop) /
    (t_base - t_loop)}, the empty loop's s per pass).
  """
  loops = {"loop": in_graph(lambda t: t, passes)}
  loops.update({name: in_graph(f, passes) for name, f in forwards.items()})
  times, ratios = time_interleaved(loops, x, repeats, 1)
  loop = times["loop"] / passes
  net = {name: (ratios[name] - 1.0) / (ratios["base"] - 1.0)
         for name in forwards}
  return ({name: times[name] / passes - loop for name in forwards}, net,
          loop)


def tile(x, num_samples):
  return tf.nest.map_structure(
      lambda t: tf.tile(t, [num_samples] + [1] * (len(t.shape) - 1)), x)


def mc_compiled(model, num_samples, tiled=True, plain=False):
  """T stochastic passes: one tiled batch, or T calls in one tf.function.

  With seeded dropout masks (`seeded_dropout.mc_dropout_model`), or with `plain`
  Keras dropout (`model(x, training=True)`).
  """
  mc = model if plain else seeded_dropout.mc_dropout_model(model)

  @tf.function
  def tiled_fn(x):
    p = mc(tile(x, num_samples), training=plain)
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
      model, tf.nest.map_structure(np.asarray, x), num_samples=num_samples,
      batch_size=batch,
      progress=False)


def time_interleaved(fns, x, repeats, inner, budget_s=0.05):
  """Times every fn in rounds; returns ({name: median s/call}, ratios).

  Each round times each fn over up to `inner` calls (fewer for slow fns:
  about `budget_s` of calls). `ratios[name]` holds, per round, the fn's time
  over the first fn's time in the same round: adjacent in time, so the
  machine's drift cancels out.
  """
  calls = {}
  for name, fn in fns.items():
    for _ in range(3):
      start = time.perf_counter()
      tf.nest.map_structure(np.asarray, fn(x))  # trace and warm up
      once = time.perf_counter() - start
    calls[name] = int(np.clip(round(budget_s / max(once, 1e-9)), 1, inner))
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        out = fn(x)
      tf.nest.map_structure(np.asarray, out)
      samples[name].append((time.perf_counter() - start) / calls[name])
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
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
  parser.add_argument(
      "--inter_op_parallelism", type=int, default=0,
      help="TF inter-op threads (0: TF's choice). 1 runs independent ops one "
      "at a time, as `dropvar_model_server "
      "--tensorflow_inter_op_parallelism=1` does.")
  args = parser.parse_args()
  tf.config.threading.set_inter_op_parallelism_threads(
      args.inter_op_parallelism)
  repeats, inner = (5, 20) if args.quick else (15, 50)
  graph_repeats = 5 if args.quick else 11
  keras.utils.set_random_seed(0)
  description, build, make_input = MODELS[args.model]
  base = build()
  default = "head, all layers, summary (default)"
  variants = {
      default: heads.add_variation_head(base),
      "head, all layers, neurons": heads.add_variation_head(
          base, features="neurons"),
  }
  try:
    variants["head + moment propagation"] = heads.add_variation_head(
        base, include_moments=True)
  except ValueError as e:
    print(f"(no moment-propagation variant: {e})")
  print(f"base: {description}; T={args.num_samples}; call repeats="
        f"{repeats}x{inner}, graph repeats={graph_repeats}; inter-op threads "
        f"{tf.config.threading.get_inter_op_parallelism_threads()} "
        "(0: TF's choice)")
  def forward(m):
    return lambda x: m(x, training=False)

  for batch in (1, 256):
    x = tf.nest.map_structure(
        tf.constant, make_input(batch, np.random.default_rng(0)))
    fns = {"base": compiled(base)}
    fns.update({name: compiled(m) for name, m in variants.items()})
    fns["mc tiled"] = mc_compiled(base, args.num_samples)
    fns["mc looped"] = mc_compiled(base, args.num_samples, tiled=False)
    fns["plain passes"] = mc_compiled(base, args.num_samples, tiled=False,
                                      plain=True)
    fns["targets"] = targets_call(base, args.num_samples, batch)
    t, ratios = time_interleaved(fns, x, repeats, inner)
    passes = GRAPH_PASSES[batch]
    graph = {"base": forward(base)}
    graph.update({name: forward(m) for name, m in variants.items()})
    graph["base, XLA"] = compiled(base, xla=True)
    graph["default, XLA"] = compiled(variants[default], xla=True)
    if batch == 1:
      graph["mc tiled"] = mc_compiled(base, args.num_samples)
    gt, net, loop = time_in_graph(graph, x, passes, graph_repeats)
    print(f"\nbatch {batch}: base: call {t['base'] * 1e3:.3f} ms, graph "
          f"{gt['base'] * 1e3:.3f} ms ({passes} passes in one loop, net of "
          f"the empty loop's {loop * 1e3:.3f} ms a pass)")
    for name in variants:
      print(f"  (a) {name}: call {ratio_text(ratios[name])}; graph "
            f"{gt[name] * 1e3:.3f} ms = {ratio_text(net[name])}")
    print(f"  (a) XLA, one launch per pass: default dual "
          f"{gt['default, XLA'] * 1e3:.3f} ms / base "
          f"{gt['base, XLA'] * 1e3:.3f} ms = "
          f"{ratio_text(net['default, XLA'] / net['base, XLA'])}; "
          f"/ the base in graph mode = {np.median(net['default, XLA']):.2f}x; "
          f"/ the default dual in graph mode = "
          f"{np.median(net['default, XLA'] / net[default]):.2f}x")
    for kind in ("tiled", "looped"):
      paired = np.median(ratios[f"mc {kind}"] / ratios[default])
      print(f"  (b) MC dropout T={args.num_samples}, {kind}: call "
            f"{t[f'mc {kind}'] * 1e3:.3f} ms = {paired:.1f}x the default "
            "dual")
    if "mc tiled" in graph:
      paired = np.median(net["mc tiled"] / net[default])
      print(f"  (b) graph: MC dropout T={args.num_samples}, tiled "
            f"{gt['mc tiled'] * 1e3:.3f} ms = {paired:.1f}x the default "
            f"dual; bound (tiled MC / the base alone, which no one-pass "
            f"method in graph mode can pass): "
            f"{np.median(net['mc tiled']):.1f}x")
    print(f"  (b) call bound: tiled MC / the base alone = "
          f"{np.median(ratios['mc tiled']):.1f}x")
    paired = ratios["targets"] / ratios["plain passes"]
    q1, med, q3 = np.percentile(paired, [25, 50, 75])
    print(f"  (c) mc_dropout_targets {t['targets'] * 1e3:.3f} ms / "
          f"{args.num_samples} plain compiled passes "
          f"{t['plain passes'] * 1e3:.3f} ms = {med:.2f}x "
          f"(IQR {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
  main()
