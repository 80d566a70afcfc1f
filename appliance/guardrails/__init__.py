"""Guardrails: which apply to a request (policy), and the checks themselves (pii, moderation, schema).

Pure text and JSON work, no I/O: the pipeline (core/) calls a moderation model or a repair attempt itself.
Imports common/ and observe/.
"""
