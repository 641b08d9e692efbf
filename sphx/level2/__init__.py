"""Level 2 modules: Level 2a in time order per band, Level 2b per image."""

from .reference_pixels import remove_reference_pixels

__all__ = ["remove_reference_pixels"]
