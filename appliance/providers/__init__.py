"""Backends by wire format: each module translates to and from OpenAI's shapes; transport does the I/O.

Imports common/ only; never storage or the web server.
"""
