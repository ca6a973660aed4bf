"""Models: resolving a checkpoint's family, loading it, and building new ones locally."""
