"""The operator console under /ui/ on its own port: the page, its login cookie, and the admin API, events and shell it serves."""
