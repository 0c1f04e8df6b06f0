"""Actions: the registry, the built-in actions, and what an action sees when it runs."""
