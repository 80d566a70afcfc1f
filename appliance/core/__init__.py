"""The gateway itself: one request's journey (pipeline, relay, exchange), a worker's state (gateway, catalog,
discovery) and the policies it applies (routing, resilience, cache).

Imports accounts/, observe/, providers/, storage/ and common/; never an API surface or the web server.
"""
