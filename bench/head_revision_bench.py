"""Graph time of the default dual's head: this tree against a git revision.

  python bench/head_revision_bench.py --against=HEAD~1 [--repeats=9]

Builds the default dual of `bench/dual_bench.py`'s 3x256 MLP once, and
traces it twice: with this tree's `OutputDropoutDelta` and `VariationOutput`
methods, and with those of `--against` (read with `git show`, their classes
unregistered). Both traces are timed with the base model side by side, at
batch 1 and 256, in `dual_bench.time_in_graph`'s interleaved graph loops.
Prints the op count of each trace (a `tf.cond`'s branches included;
constants, placeholders, identities and variable reads left out), the
largest output difference, each one's time per pass and / base, and the
per-round median of this tree / the revision
with its interquartile range. Only the methods of those two classes are
swapped: a change elsewhere is in both traces.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dual_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from dropvar_tf._keras import keras, tf  # pylint: disable=g-import-not-at-top
from dropvar_tf import head_layers  # pylint: disable=g-import-not-at-top
from dropvar_tf import heads  # pylint: disable=g-import-not-at-top
from dropvar_tf import layers  # pylint: disable=g-import-not-at-top

_SWAPPED = {"layers": (layers, "OutputDropoutDelta",
                       ("call", "_output", "_smoothed_std", "_linearised_std",
                        "logit_and_spread")),
            "head_layers": (head_layers, "VariationOutput", ("call",))}
_REGISTER = '@keras.saving.register_keras_serializable(package="dropvar_tf")\n'
_NOT_OPS = ("Const", "Placeholder", "Identity", "ReadVariableOp", "NoOp")


def _methods_at(revision):
  """[(class, name, function or None)] of the swapped methods at revision."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  methods = []
  for module_name, (module, class_name, names) in _SWAPPED.items():
    source = subprocess.run(
        ["git", "show", f"{revision}:dropvar_tf/{module_name}.py"],
        cwd=root, check=True, capture_output=True, text=True).stdout
    namespace = dict(vars(module))
    exec(compile(source.replace(_REGISTER, ""),  # pylint: disable=exec-used
                 f"{revision}:{module_name}.py", "exec"), namespace)
    old = vars(namespace[class_name])
    methods += [(getattr(module, class_name), name, old.get(name))
                for name in names]
  return methods


def _swap(methods):
  """Sets each (class, name, function) (None: deletes the class's own)."""
  for cls, name, fn in methods:
    if fn is not None:
      setattr(cls, name, fn)
    elif name in vars(cls):
      delattr(cls, name)


def _trace(dual, x, methods):
  """A concrete function of `dual` traced with `methods` swapped in."""
  saved = [(cls, name, vars(cls).get(name)) for cls, name, _ in methods]
  try:
    _swap(methods)
    fn = tf.function(lambda t: dual(t, training=False))
    return fn.get_concrete_function(x)
  finally:
    _swap(saved)


def _num_ops(concrete):
  """Ops of the trace, those of its functions (a `tf.cond`'s) included."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes += list(function.node_def)
  return sum(node.op not in _NOT_OPS for node in nodes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--against", default="HEAD")
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  keras.utils.set_random_seed(0)
  base = dual_bench.base_model()
  dual = heads.add_variation_head(base)
  old_methods = _methods_at(args.against)
  print(f"3x256 MLP, default dual; this tree against {args.against}")
  for batch in (1, 256):
    x = tf.constant(np.random.default_rng(0).normal(
        size=(batch, 64)).astype("float32"))
    old, new = _trace(dual, x, old_methods), _trace(dual, x, [])
    diff = max(float(np.max(np.abs(old(x)[k] - new(x)[k])))
               for k in ("prediction", "variation"))
    forwards = {"base": base, args.against: old, "this tree": new}
    forwards = {k: (lambda t, f=f: f(t, training=False)) if f is base
                else (lambda t, f=f: f(t)) for k, f in forwards.items()}
    times, ratios, _ = dual_bench.time_in_graph(
        forwards, x, dual_bench.GRAPH_PASSES[batch], args.repeats)
    paired = ratios["this tree"] / ratios[args.against]
    q1, med, q3 = np.percentile(paired, [25, 50, 75])
    print(f"batch {batch}: ops {_num_ops(old)} -> {_num_ops(new)} (a tf.cond's "
          f"branches counted), largest output difference "
          f"{diff:.2g}")
    for name in forwards:
      print(f"  {name}: {times[name] * 1e3:.4f} ms a pass, "
            f"{np.median(ratios[name]):.2f}x base")
    print(f"  this tree / {args.against}: {med:.3f} (IQR {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
  main()
