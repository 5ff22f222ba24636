"""ldmkit's version, in a foundation module: the plugin manager and the data writer read it
without importing the package root (which re-exports the pipeline)."""

__version__ = "0.1.0"
