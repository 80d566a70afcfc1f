"""Where state lives: SQLite (or PostgreSQL with ``[database] url``: pg.py, chosen in engine.py) for what lasts
(the only place SQL appears), shared memory or Redis (state.py) for live counters.

Imports only common/. Nothing outside this package knows which engine holds the data.
"""
