"""What every CLI module shares: the consoles and the exit codes."""

from __future__ import annotations

from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3

out = Console()
err = Console(stderr=True, soft_wrap=True)
