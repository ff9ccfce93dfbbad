"""Store: the node's state (index, assembly, cases, jobs, sends) and its files on disk."""
