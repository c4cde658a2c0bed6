"""Campaign worker: arq worker settings, processors, action handlers, HTTP server, CLI."""
