"""Cross-cutting entry-point helpers: settings (read only by entry points) and the package version."""

__version__ = "0.1.0"
