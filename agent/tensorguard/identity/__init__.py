"""identity: short-lived machine certificates."""
