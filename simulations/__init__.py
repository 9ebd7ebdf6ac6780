"""Many simulated hospitals on one machine: data, partitions, runner, baselines, benches."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
