"""The paper's study, kept apart from the library.

- `config`: the study's settings (`StudyConfig`, `small_config`, the tasks).
- `tasks`: each task's data, base model and base-model quality.
- `cache`: the stage cache (base models, MC targets, result rows on disk).
- `estimators`: the variation heads and baselines compared, and their names.
- `timing`: inference cost per example (one pass, T-pass MC dropout).
- `rows`: result rows (one estimator's scores) and finding them.
- `checks`: the issue's goals checked against the rows.
- `runner`: `run_study`, the study itself (`python -m dropvar_tf.study.cli`).
- `report`: fidelity tables, plots and the report (results.md, results.json).
- `shift`: the shift study (`cli --shift`): estimates on shifted inputs of
  every task against MC DPV (shift.md, shift.json).
- `data`, `models`: task loaders and reference base models.
- `demo`: the digits demo behind the `dropvar` command.

The library proper (`import dropvar_tf`) never imports this package, so its
extra dependencies (scikit-learn, matplotlib, tensorflow-datasets) stay off
the core import path.
"""
