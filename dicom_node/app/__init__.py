"""The composition root: command line, node, roles."""
