"""Level 1 modules: independent per image, raw slopes to engineering units."""

from .engineering_units import convert_to_engineering_units

__all__ = ["convert_to_engineering_units"]
