"""Assemble: when a series or a study is complete, and which routes it matches."""
