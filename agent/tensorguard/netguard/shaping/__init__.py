"""Defence machines: pure event-driven objects shared by the live pacer and the offline simulator."""
