"""appliance: a self-hosted LLM gateway that ships as one executable."""

__version__ = "0.1.0"
