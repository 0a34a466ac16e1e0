"""netguard: traffic-analysis defence for robot uplinks."""
