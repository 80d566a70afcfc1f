"""OpenAI Responses over chat backends: items.py (input items), translate.py (requests, Response objects,
errors), stream.py (chat chunks -> Responses events).

Each module imports only the ones listed before it; none does I/O.
"""
