"""Exceptions raised by sphx.

Every error names what is wrong (the file, recipe key, variable, band or observation)
and what was expected, so that a failed run can be fixed without a debugger. All
derive from :class:`SphxError`; most also derive from the builtin exception a Python
user would expect (``ValueError``, ``KeyError``, ``FileNotFoundError``), so existing
``except`` clauses keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class SphxError(Exception):
    """Base class of every exception raised on purpose by sphx."""


class InstrumentError(SphxError, ValueError):
    """An instrument geometry that cannot exist, or a band it does not have."""


class CubeValidationError(SphxError, ValueError):
    """An exposure cube that does not follow the data model.

    Parameters
    ----------
    problems
        One line per problem found; all of them are reported at once.
    level
        The processing level the cube was checked against, if any.
    """

    def __init__(self, problems: Iterable[str], *, level: str | None = None) -> None:
        self.problems = list(problems)
        self.level = level
        where = f" for level {level!r}" if level else ""
        head = f"exposure cube is not valid{where}: {len(self.problems)} problem(s)"
        super().__init__("\n  - ".join([head, *self.problems]))


class ObservationIdError(CubeValidationError):
    """An observation id that is not in the SPHEREx form ``2025W51_1A_0684_2``."""

    def __init__(self, obsid: object) -> None:
        self.obsid = obsid
        super().__init__(
            [
                (f"observation id {obsid!r} is not in the SPHEREx form "
                "YYYYWww_PL_NNNN_S (for example '2025W51_1A_0684_2')")
            ]
        )


class OrderError(SphxError, ValueError):
    """Exposures that are not in time order where time order is required."""


class DuplicateExposureError(SphxError, ValueError):
    """The same observation appears twice, or clashes with a stored one."""


class RepositoryError(SphxError):
    """A data repository that is missing, damaged or in use."""


class RepositoryNotFoundError(RepositoryError, FileNotFoundError):
    """No sphx repository at the given location."""


class LevelNotFoundError(RepositoryError, KeyError):
    """A processing level that the repository does not hold."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class SelectionError(RepositoryError, KeyError):
    """A selection of bands or observations that the level does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


class RepositoryLockedError(RepositoryError):
    """Another live process is writing the same level."""


class WriteError(RepositoryError):
    """A write that failed part-way; completed images are kept, a rerun completes it."""


class CalibrationError(SphxError, ValueError):
    """A calibration product that is missing, unknown, or of the wrong shape or band."""


class CalibrationNotFoundError(CalibrationError, KeyError):
    """No stored version of a calibration product."""

    def __str__(self) -> str:
        return str(self.args[0])


class StepError(SphxError, ValueError):
    """A step applied to a cube it cannot process (wrong units, missing variable)."""


class UnknownStepError(StepError, KeyError):
    """A step name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigError(StepError):
    """A step configuration with an unknown key or a value of the wrong type."""


class RecipeError(SphxError, ValueError):
    """A recipe that cannot run: bad YAML, unknown step or key, missing input level.

    Parameters
    ----------
    message
        What is wrong and what was expected.
    file
        The recipe file, when the recipe came from one.
    key
        The dotted path of the offending entry, e.g. ``stages[0].steps[1].config.sigma``.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.reason = message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ComputeError(SphxError, ValueError):
    """A compute profile that is unknown or inconsistent."""


class OrbitElementsError(SphxError, ValueError):
    """An orbital-elements file or table that cannot be read (names the line or column)."""


class FitsFormatError(SphxError, ValueError):
    """A FITS file that is not a readable SPHEREx product: missing HDU, wrong shape,
    truncated, unknown flag name, not SPHEREx at all. The message names the file and,
    where it applies, the HDU and keyword.
    """

    def __init__(self, message: str, *, file: str | None = None, hdu: str | None = None) -> None:
        self.file, self.hdu = file, hdu
        where = ", ".join(p for p in (file, f"HDU {hdu}" if hdu else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class SimulationError(SphxError, ValueError):
    """A simulation configuration that cannot be simulated (names the setting and why)."""


class IncompleteWriteWarning(UserWarning):
    """A level holds images of an interrupted write; rerunning the write completes them."""
