"""The hospital: ClientApp, local training, site data."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
