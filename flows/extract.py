"""Deployment entrypoints of the extraction flows, which live in :mod:`wsimil.extract.flows`.

``prefect.yaml`` and ``flows/deploy.py`` name ``flows/extract.py:select_tiles`` and
``flows/extract.py:extract_features``; a worker needs only the installed package.
"""

from wsimil.extract.flows import extract_features, select_tiles

__all__ = ["extract_features", "select_tiles"]
