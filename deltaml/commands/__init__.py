"""The ``deltaml`` commands, one module per kind of party; ``deltaml.cli`` parses and dispatches."""
