"""`hiermem serve`: an OpenAI-compatible server for a trained run (app.py), its request batching (engine.py),
the wire format (protocol.py), Prometheus metrics (metrics.py) and the memory explorer page (explore.py,
static/explorer.html). The serve layer sits above eval (generation, runs) and below the CLI."""
