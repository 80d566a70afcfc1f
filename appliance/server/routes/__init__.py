"""Thin handlers: parse, call the pipeline, render."""
