"""Prompt sets bundled with moaa (package data)."""
