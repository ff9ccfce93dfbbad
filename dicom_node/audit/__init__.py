"""The audit trail: records, chains (file, database), verification and syslog export."""
