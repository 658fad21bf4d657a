"""Forward-time cost of the "out_of_range" output, measured side by side.

For a `dual_bench.py` model (default: the 3x256 MLP), times the base model,
the default dual (`add_variation_head(base)`) and the same dual with
`out_of_range=True`, at batch 1 and 256, in graph mode (passes in one
tf.while_loop, net of the empty loop: `dual_bench.time_in_graph`), in
interleaved rounds. Prints each dual's time as a ratio of the base's, and
the signal's own cost: (dual with it - default dual) / base, per round. On
a busy machine that difference drowns in the duals' own spread, so it also
times the `OutOfRange` layer alone, in the same kind of loop, on the dual's
probe features of the batch (against a loop that only concatenates them).

  python bench/out_of_range_bench.py [--model=mlp|movielens|criteo|cnn]
      [--features=summary|neurons] [--quick]
"""

import argparse

import numpy as np

import dual_bench
from dropvar_tf import heads
from dropvar_tf._keras import keras, tf


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--model", choices=sorted(dual_bench.MODELS),
                      default="mlp")
  parser.add_argument("--features", choices=("summary", "neurons"),
                      default="summary")
  args = parser.parse_args()
  repeats = 5 if args.quick else 11
  keras.utils.set_random_seed(0)
  description, build, make_input = dual_bench.MODELS[args.model]
  base = build()
  duals = {flag: heads.add_variation_head(base, features=args.features,
                                          out_of_range=flag)
           for flag in (False, True)}
  print(f"base: {description}; features={args.features}; graph repeats="
        f"{repeats}")
  for batch in (1, 256):
    x = tf.nest.map_structure(
        tf.constant, make_input(batch, np.random.default_rng(0)))
    forwards = {"base": lambda t: base(t, training=False)}
    for flag, dual in duals.items():
      forwards[f"dual{' + out_of_range' if flag else ''}"] = (
          lambda t, d=dual: d(t, training=False))
    passes = dual_bench.GRAPH_PASSES[batch]
    times, net, loop = dual_bench.time_in_graph(forwards, x, passes, repeats)
    print(f"\nbatch {batch}: base {times['base'] * 1e3:.3f} ms a pass "
          f"({passes} passes in one loop, net of the empty loop's "
          f"{loop * 1e3:.3f} ms)")
    for name in forwards:
      if name != "base":
        print(f"  {name}: {times[name] * 1e3:.3f} ms = "
              f"{dual_bench.ratio_text(net[name])}")
    extra = net["dual + out_of_range"] - net["dual"]
    q1, med, q3 = np.percentile(extra, [25, 50, 75])
    print(f"  out_of_range's own cost: {med:+.3f} x base (IQR {q1:+.3f} to "
          f"{q3:+.3f}), per round (dual + out_of_range - dual) / base")
    dual = duals[True]
    layer = heads.out_of_range_layer(dual)
    probes = [tf.constant(f) for f in keras.Model(
        dual.input, heads.out_of_range_feature_tensors(dual))(x)]
    # time_in_graph's reference is named "base": here the concat.
    alone = {"base": lambda f: tf.concat(f, axis=-1), "layer": layer}
    own, _, _ = dual_bench.time_in_graph(alone, probes, passes, repeats)
    extra = own["layer"] - own["base"]
    print(f"  the layer alone on {sum(int(f.shape[-1]) for f in probes)} "
          f"features: {extra * 1e3:.4f} ms a pass more than a concat = "
          f"{extra / times['base'] * 100:.1f}% of the base's pass")


if __name__ == "__main__":
  main()
