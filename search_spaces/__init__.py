"""The search spaces, one ``<rule>.yaml`` per rule; read as package data (importlib.resources)."""
