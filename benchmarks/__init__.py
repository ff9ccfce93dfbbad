"""Benchmarks of the node against DCMTK on loopback (``make bench``)."""
