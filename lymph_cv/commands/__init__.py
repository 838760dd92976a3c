"""Thin Click commands, one module per stage; each parses options, calls the library, prints."""
