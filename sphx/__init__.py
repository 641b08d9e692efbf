"""sphx: the SPHEREx image and spectrophotometry pipeline on xarray, Dask and Zarr.

The exposure cube is an ``xarray.Dataset`` on ``(band, obs, y, x)``; every module is a
lazy function on it; a repository stores each processing level as a Zarr v3 group.
"""

__version__ = "0.1.0"

from . import accessor as _accessor  # noqa: F401  (registers ds.sphx)
from . import flags
from .cube import make_cube, nominal_spectral_maps
from .instrument import SPHEREX, SPHEREX_SMALL, Band, Instrument
from .io import Repository, open_repository
from .pipeline import get_step, load_recipe, run_recipe, steps
from .validate import validate_cube

__all__ = [
    "SPHEREX",
    "SPHEREX_SMALL",
    "Band",
    "Instrument",
    "Repository",
    "__version__",
    "flags",
    "get_step",
    "load_recipe",
    "make_cube",
    "nominal_spectral_maps",
    "open_repository",
    "run_recipe",
    "steps",
    "validate_cube",
]
