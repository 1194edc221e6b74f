from tests.netlab import lab  # noqa: F401  (fixture)
