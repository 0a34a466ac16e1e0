"""Command-line entry points: `tensorguard` (runs units) and `tgctl` (talks to them)."""
