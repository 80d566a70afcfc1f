"""Wire models, only where validation earns its cost."""
