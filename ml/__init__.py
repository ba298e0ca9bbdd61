"""Neural networks that read size and dispersion from scattering patterns."""
