"""wsimil: whole-slide-image multiple-instance learning with experiment tracking.

The package follows the data flow: slide → tiles → features → bags → model → fit →
cross-validation / tuning → tracked run → registered model → served prediction.
Importing it has no side effects; only ``wsimil.cli`` reads ``params.yaml``.
"""

__version__ = "0.1.0"
