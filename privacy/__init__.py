"""What protects the patients: differential privacy, accounting, secure aggregation."""

import models  # noqa: F401  (sets Flower environment defaults before Flower loads)
