"""Backends by wire format: each module translates to and from OpenAI's shapes."""
