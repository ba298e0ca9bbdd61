"""Nanocrystal total-scattering simulation: structures, clusters, Debye engines, patterns."""
