"""Shared by the Ray layers (pipelines, serve): stage configs, Ray start-up, the vector registry."""
