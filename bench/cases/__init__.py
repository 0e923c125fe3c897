"""One module per benchmark case; each returns a JSON-ready dict."""
