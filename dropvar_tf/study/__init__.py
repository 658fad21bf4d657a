"""The paper's study, kept apart from the library.

Task loaders (`data`), reference base models (`models`), the study runner
(`study`, `python -m dropvar_tf.study.cli`), its report and plots (`report`)
and the digits demo behind the `dropvar` command (`demo`). The library proper
(`import dropvar_tf`) never imports this package, so its extra dependencies
(scikit-learn, matplotlib, tensorflow-datasets) stay off the core import path.
"""
