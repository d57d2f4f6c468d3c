"""Engine build: the Nemotron-NAS graph description, checkpoints, importers and engine formats."""

__version__ = "0.1.0"
