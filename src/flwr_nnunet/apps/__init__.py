"""The Flower apps' wiring: run-config schema, the server's run, history and plot, the client's message handling."""
