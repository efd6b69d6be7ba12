"""One module per ``petserve`` subcommand."""
