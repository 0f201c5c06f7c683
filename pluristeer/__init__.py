"""The pluristeer command line: one Typer app over the pipelines stages and serve."""
