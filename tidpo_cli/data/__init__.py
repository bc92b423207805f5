"""Preference data: reading files and hub datasets, format conversion, tokenisation, collation."""
