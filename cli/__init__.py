"""The ``ism-edge`` command-line application (typer). Thin: parses, then calls the packages."""
