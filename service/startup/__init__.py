"""Choosing what to serve at startup: the hardware, the profile, the engine in the repository."""
