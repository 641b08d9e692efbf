"""Level 3 (paper section 4.3): spectra of every catalogued source.

- :mod:`sphx.level3.background`: Estimate Diffuse Background (global or local).
- :mod:`sphx.level3.photometry`: Perform Forced Photometry on one spectral image.
- :mod:`sphx.level3.catalogs`: the primary, secondary and high-reliability catalogs of a
  sky tile.
- :mod:`sphx.level3.run`: the scatter-gather over images (3a) and tiles (3b), as run by
  ``recipes/l3.yaml``.
"""
