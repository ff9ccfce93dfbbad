"""Send: delivery of results to destinations and the senders per destination type."""
