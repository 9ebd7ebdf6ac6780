"""The hospital: ClientApp, local training, site data."""

import models  # noqa: F401  (sets Flower environment defaults before Flower loads)
