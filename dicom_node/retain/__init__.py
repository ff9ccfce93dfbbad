"""Retain: purging received instances and results after delivery or a time."""
