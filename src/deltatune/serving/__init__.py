"""Serving: one base model and many adapters answering requests, over HTTP or from the command line."""
