"""A hospital's own data: CSV manifest + DICOM files -> checked, cached, fingerprinted images.

Reading a manifest and decoding its files is :mod:`imaging`'s job (shared with a coordinator
that holds an evaluation set). What is the hospital's own lives here: ``config``
(SiteDataConfig: the reader's settings plus the split, error budget and cache), ``cache``
(decoded images on disk), ``split`` (per patient), ``dataset`` (all of it together, with
duplicate and patient checks), ``check`` (the report), ``problems`` (SiteDataError).
"""

from client.data.config import SiteDataConfig, from_node_config, load_site_data_config
from client.data.dataset import SiteReport, load_manifest_site, prepare_site
from client.data.problems import ManifestError, Problem, SiteDataError

__all__ = [
    "ManifestError", "Problem", "SiteDataConfig", "SiteDataError", "SiteReport",
    "from_node_config", "load_manifest_site", "load_site_data_config", "prepare_site",
]
