"""stage1 head lab: heads, sweeps, calibration, certification and bundles on cached features."""

__version__ = "0.1.0"
