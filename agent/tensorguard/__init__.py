"""TensorGuard host agent: one package shared by the netguard, identity and fl units."""

__version__ = "0.1.0"

UNITS: tuple[str, ...] = ("netguard", "identity", "fl")
