"""What protects the patients: differential privacy, accounting, secure aggregation."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
