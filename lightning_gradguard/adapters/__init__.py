"""Adapters: each translates one framework's hooks into engine and reporter calls."""
