"""Receive: the C-STORE SCP, its connection limits, access control and incoming files."""
