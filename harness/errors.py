"""Typed errors raised deep in the harness and turned into one line and an exit code at the CLI edge."""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness reports to the user as one clear line.

    `partial`: some of a stage's units (variants) failed and the others are done; the pipeline goes on with the
    later stages and reports this error, with its exit code, at the end."""

    exit_code = 1

    def __init__(self, message: str = "", *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class ConfigError(HarnessError):
    """The experiment file, environment or command line asks for something invalid."""

    exit_code = 2


class BuildError(HarnessError):
    """llama.cpp could not be obtained, configured or compiled."""

    exit_code = 3


class SourceError(BuildError):
    """The llama.cpp source (git tag, PyPI version, local tree, prebuilt dir) does not exist or is unusable."""


class ToolMissingError(BuildError):
    """A program the build needs (cmake, a compiler, nvcc, git) is not installed."""


class ModelError(HarnessError):
    """A model could not be found, downloaded, converted or quantized."""

    exit_code = 4


class ServerError(HarnessError):
    """llama-server could not be started, sized or talked to."""

    exit_code = 5


class MMLUError(HarnessError):
    """The MMLU data or the llama-perplexity multiple-choice run failed."""

    exit_code = 6


class LoadTestError(HarnessError):
    """The Locust load test could not run or its results are unusable."""

    exit_code = 7


class ReportError(HarnessError):
    """The results could not be merged or rendered."""

    exit_code = 8


class DiskError(HarnessError):
    """A run or cache directory cannot be written, or the disk has no room for what is about to be written."""

    exit_code = 9
