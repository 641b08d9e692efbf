"""The sky and instrument simulator: the ground truth every module is tested against.

In the spirit of the SPHEREx Sky Simulator (Crill et al. 2025): from a seeded
configuration it writes raw exposures into a sphx repository together with everything
that was true. Same configuration and seed, same bytes.

>>> from sphx.simulate import simulate_survey
>>> report = simulate_survey({"instrument": "SPHEREx-small", "survey": {"n_exposures": 4}},
...                          "my-survey")  # doctest: +SKIP

Modules: :mod:`~sphx.simulate.survey` (plan and orbit), :mod:`~sphx.simulate.sky`
(reference catalogue and spectra), :mod:`~sphx.simulate.optics` (filters, PSF, focal
plane), :mod:`~sphx.simulate.detector` (per-pixel properties),
:mod:`~sphx.simulate.simulator` (one exposure at a time), :mod:`~sphx.simulate.products`
(calibration products and detector truth) and :mod:`~sphx.simulate.run` (writing a survey
into a repository). The zodiacal-light model (Kelsall et al. 1998) is :mod:`sphx.zodi`,
shared with the pipeline's Get Zodi Model step.
"""

from .config import SimulationConfig, load_config
from .run import SimulationReport, simulate_survey
from .simulator import TRUTH_LEVEL, ImageResult, Simulator

__all__ = [
    "TRUTH_LEVEL",
    "ImageResult",
    "SimulationConfig",
    "SimulationReport",
    "Simulator",
    "load_config",
    "simulate_survey",
]
