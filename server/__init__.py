"""The coordinator: ServerApp, round loop, central evaluation, run records."""

import models  # noqa: F401  (sets Flower environment defaults before Flower loads)
