"""The `medfed` command line: parses arguments and calls the rooms, no logic of its own."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
