"""The control plane (`tensorguard server`): for now its CA with RFC 7030 (EST) enrolment."""
