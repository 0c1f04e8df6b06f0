"""The rule language: safe YAML with positions, validation, the frozen tree, the sandbox."""
