"""The coordinator: ServerApp, round loop, central evaluation, run records."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
