"""The web layer, the only package that imports sanic: the app, workers and their lifecycle, the routes.

May import every package but cli/.
"""
