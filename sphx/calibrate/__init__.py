"""Calibration solvers (paper section 4.4) as Dask reductions over many images."""
