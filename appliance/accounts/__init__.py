"""Who may do what, and what it cost: API keys, rate limits and budgets, token usage, usage reports.

Imports common/ and storage/.
"""
