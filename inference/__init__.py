"""Running a published adapter at a hospital: ``medfed predict``'s work, without the CLI.

Modules: ``published`` (find the adapter and its card, check every pin, rebuild the model),
``studies`` (a manifest or a folder of DICOM files -> studies, through the hospital's reader and
its guards), ``predict`` (stream studies through the model in batches, write the predictions
CSV and summary), ``validation`` (score labelled predictions: external validation). Nothing
here opens a network connection: the adapter, the base weights and the images are local.
"""
