"""Cohort manifests, splits and the leakage audit."""
