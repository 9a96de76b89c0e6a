"""Cross-cutting pieces: settings (read only by entry points), the domain rules every package shares, the version."""

__version__ = "0.1.0"
