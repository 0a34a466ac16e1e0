"""Unit life cycle: config store, the three services, systemd notification, metrics."""
