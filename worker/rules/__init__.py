"""Shipped routing rules (``default.yaml``), loaded by :mod:`worker.routing`.

This is a regular package so that ``importlib.resources`` finds the YAML file in a source
checkout, an editable install and a wheel alike.
"""
