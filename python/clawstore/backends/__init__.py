"""Data planes. Nothing above this package knows paths or object keys."""
