"""Where state lives: SQLite for what lasts (the only place SQL appears), shared memory for live counters.

Imports only common/. Nothing outside this package knows the data is in SQLite.
"""
