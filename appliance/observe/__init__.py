"""What the appliance records about itself as it works: Prometheus metrics (and their folder), the access log.

Imports common/ only, so every layer above may instrument itself.
"""
