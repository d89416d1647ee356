"""The `flatdino` console script and the demo driver: thin typer commands that build a config and call one function."""
