"""pytest configuration shared by the test files."""


def pytest_collection_modifyitems(config, items):
  # tf.test.TestCase inherits a `test_session` context manager that pytest
  # collects as a test and then skips ("Not a test."): drop it.
  kept = [item for item in items if item.name != "test_session"]
  if len(kept) != len(items):
    config.hook.pytest_deselected(
        items=[item for item in items if item.name == "test_session"])
    items[:] = kept
