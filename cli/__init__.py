"""The `flatdino` console script: thin typer commands that build a config and call one function."""
