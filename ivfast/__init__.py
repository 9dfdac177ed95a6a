"""ivfast: a performance-first training engine for InternVideo-Next video encoders."""

__version__ = "0.1.0"
