"""xclip-serve: command-line entry point."""
