"""Inference: the engine protocol's request and result types, the built-in transformers
engine, and the OpenAI-compatible server in front of any engine."""
