"""Numerical kernels: numpy and numba functions on plain arrays, no xarray, no dask."""
