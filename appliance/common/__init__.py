"""The ground floor: settings, the error table, the wire readers (SSE, chat messages), bundled resources.

Imports nothing else from the appliance; everything may import it.
"""
