"""Catalogues: what reludoctor knows, as plain data (no torch, no other reludoctor import)."""
