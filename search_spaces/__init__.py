"""The shipped search spaces, installed as the package data ``ranksearch.search_spaces`` (see setup.py)."""
