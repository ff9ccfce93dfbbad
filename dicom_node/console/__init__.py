"""The web console: small server-rendered pages over the node's state (docs/security.md)."""
