"""The ``cryptfs`` command: thin click wrappers around the library."""
