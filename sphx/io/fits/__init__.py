"""FITS at the edges: SPHEREx archive files written and read exactly as IRSA has them.

- :mod:`.spectral_image`: Level 2 spectral images (7 HDUs), whole levels, cutouts;
- :mod:`.read`: many archive files (QR2 and QR3, full frames and cutouts) as one lazy cube;
- :mod:`.calibration`: calibration products in their archive formats (and the gain YAML);
- :mod:`.level1`: Level 1 image files;
- :mod:`.headers`: the keyword map between the cube and the FITS headers.
"""

from .calibration import (
    calibration_filename,
    read_calibration_product,
    read_gain_factors,
    write_calibration_product,
    write_gain_factors,
)
from .level1 import read_level1_images, write_level1_image
from .read import open_spectral_images, read_psf
from .spectral_image import cutout, export_level, spectral_image_filename, write_spectral_image

__all__ = ["calibration_filename", "cutout", "export_level", "open_spectral_images", "read_calibration_product",
           "read_gain_factors", "read_level1_images", "read_psf", "spectral_image_filename",
           "write_calibration_product", "write_gain_factors", "write_level1_image", "write_spectral_image"]
