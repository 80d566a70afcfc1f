"""Anthropic Messages over chat backends: request.py (Messages -> chat), translate.py (answers, errors),
stream.py (chat chunks -> Messages events), native.py (passthrough to Anthropic backends).

Each module imports only the ones listed before it (native.py also the core).
"""
