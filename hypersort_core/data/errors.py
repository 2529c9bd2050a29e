"""The one error type for bad input data, so the CLI can report it as a single line."""

from pathlib import Path


class DataError(Exception):
    """A problem with a user's data: which file (or folder) and what is wrong with it."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(path, problem)
        self.path = Path(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
