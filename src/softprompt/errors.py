"""Errors meant for people: each names the file, row, field or key, the value, and the fix."""

from __future__ import annotations


class SoftpromptError(Exception):
    """Base class for every error softprompt raises on purpose.

    The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
    """


class ConfigError(SoftpromptError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in the configuration{where}:\n{lines}"
        super().__init__(message)


class DataError(SoftpromptError):
    """Input data cannot be used: unreadable file, missing column, too many bad rows, ..."""


class ModelError(SoftpromptError):
    """A base model, tokenizer or prompt artifact cannot be loaded or does not fit the task."""


class StoreError(SoftpromptError):
    """An artifact store or registry operation failed (names the bucket/key or path)."""


class IntegrityError(StoreError):
    """Stored bytes do not match the checksum recorded for them."""


class ConflictError(StoreError):
    """A conditional write lost a race (another writer got there first)."""
