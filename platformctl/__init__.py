"""The `platformctl` command line."""
