"""One module per DVC stage, each with a typed `run(...)` that the CLI calls."""
