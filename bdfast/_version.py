"""The package version, at the bottom of the import order so that every room can read it."""
__version__ = "0.1.0"
