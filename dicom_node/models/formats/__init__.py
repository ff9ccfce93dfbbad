"""Formats of models the node did not train, each a VolumeRunner (see models/runner.py)."""
