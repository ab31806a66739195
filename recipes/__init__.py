"""Recipes: configs, the shared Lightning training path and the command-line entry point."""
