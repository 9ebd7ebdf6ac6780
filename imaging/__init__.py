"""Reading labelled medical images: a CSV manifest and its DICOM (or NIfTI) files -> the
model's input, for a hospital (``client.data``) and a coordinator's evaluation set
(``server.evaluation``) alike.

Modules: ``settings`` (ReadSettings), ``manifest`` (the CSV), ``paths`` (allowed folders),
``guard`` (bounds and guards against hostile files), ``dicom`` (pydicom decoding, one frame at
a time), ``volumes`` (CT volumes), ``transforms`` (MONAI resize/scale), ``rows`` (one row to
images), ``labelled_set`` (a whole manifest as one test set), ``fingerprint``, ``problems``.
"""
