"""Built-in kvyard plugins, registered through the "kvyard" entry points."""
