"""Stages: a config in, a run folder out. Each imports the ML stack only when it runs."""
