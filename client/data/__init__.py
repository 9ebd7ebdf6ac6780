"""A hospital's own data: CSV manifest + DICOM files -> checked, cached, fingerprinted images.

Modules: ``config`` (SiteDataConfig), ``manifest`` (the CSV), ``paths`` (allowed folders),
``guard`` (bounds and guards against hostile files), ``dicom`` (pydicom decoding, one frame at a
time), ``transforms`` (MONAI resize/scale), ``cache`` (decoded images on disk), ``split`` (per
patient), ``fingerprint``, ``dataset`` (all of it together), ``check`` (the report).
"""

from client.data.config import SiteDataConfig, from_node_config, load_site_data_config
from client.data.dataset import SiteReport, load_manifest_site, prepare_site
from client.data.problems import ManifestError, Problem, SiteDataError

__all__ = [
    "ManifestError", "Problem", "SiteDataConfig", "SiteDataError", "SiteReport",
    "from_node_config", "load_manifest_site", "load_site_data_config", "prepare_site",
]
