"""fl: federated learning client."""
