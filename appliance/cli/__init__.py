"""The command line: serve, check-config, keys, usage, batches, backup, version.

The top of the house: imports the server only once a command needs it, so `appliance --help` stays fast.
"""
