"""Shared building blocks of the DecDEC setup scripts (one job per module)."""
