"""Workstation side of cartosplit: training, cartography, router, calibration and export.

The only package of the kit that imports torch/transformers; import its submodules directly
(``cartosplit.export.train``, ``cartosplit.export.calibrate``, ...) so that importing ``export`` itself stays cheap.
"""
