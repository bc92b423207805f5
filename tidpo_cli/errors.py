"""Errors a user can cause. The CLI prints them as one line and exits with code 2, no traceback."""

import argparse


class UserError(Exception):
    """A mistake in the user's config, data or paths: the message names the thing and the fix."""


class ConfigError(UserError):
    """A config value that cannot be used (unknown key, wrong type, out of range)."""


class DataError(UserError):
    """Data that cannot be read or used: the message names the file, the row and the fix."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse for the subcommands: a command-line mistake is a UserError (one line, exit 2) like every other."""

    def error(self, message: str) -> "NoReturn":  # noqa: F821
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
