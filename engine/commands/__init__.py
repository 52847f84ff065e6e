"""Subcommands of `evolve`; each module exposes main(argv) -> exit code."""
