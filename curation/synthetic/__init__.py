"""Embedded synthetic sources: procedural scenes and LAION / SA-1B shaped samples."""
