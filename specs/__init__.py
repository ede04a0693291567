"""The job contract both sides read: the validated job spec and the one user-error type."""
