"""The audit trail: events (vocabulary), the log that appends them, the key, the chain and its
stores (file, database), verification, ``audit export``'s file and the syslog export."""
