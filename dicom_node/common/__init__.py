"""What every stage shares: errors, UIDs, redaction, logging, metrics, TLS, DIMSE vocabulary."""
