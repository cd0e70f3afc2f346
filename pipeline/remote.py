"""The driver's side of Ray tasks: their results, with a task's bad input as one ConfigError line, and progress
over many of them (a bar on a terminal, plain lines in a log)."""

from __future__ import annotations

import sys
import time

import ray
from tqdm import tqdm

from agft_core.errors import InputError
from pipeline.config.sections import ConfigError


def get(refs, field: str | None = None):
    """ray.get, with a task's InputError (bad data or weights) raised as a ConfigError naming `field`:
    one line, no traceback. Ray does not retry a task that raised, so a corrupt image is reported once."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if not isinstance(cause, InputError):
            raise
        if field is None or isinstance(cause, ConfigError):  # a ConfigError already names its field
            raise cause from None
        raise ConfigError(f"{field}: {cause}") from None


class LineProgress:
    """What a log file gets instead of a bar: a plain line at every 10 % and at least every 30 s, never
    a carriage return (which `ray job logs` and CI logs would show as one endless line); nothing for work
    done within QUIET_S."""

    QUIET_S = 10

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.monotonic()
        self.shown_tenths = 0

    def update(self, n: int) -> None:
        self.done += n
        tenths = 10 * self.done // self.total
        if time.monotonic() - self.start < self.QUIET_S:
            return
        if tenths > self.shown_tenths or time.monotonic() - self.last >= 30:
            self.shown_tenths, self.last = tenths, time.monotonic()
            print(
                f"{self.label}: {self.done}/{self.total} tasks ({100 * self.done // self.total} %, "
                f"{self.last - self.start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int, label: str):
    """A bar on a terminal, plain lines in a log."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=label, unit="task", leave=False)
    return LineProgress(total, label)


def wait(refs: list, label: str, field: str | None | dict = None) -> list:
    """ray.get with progress over task completions. field: the config field a task's bad input is reported
    under, one for all or by ref. The first failure cancels the tasks still running."""
    if not refs:
        return []
    pending = list(refs)
    results = {}
    with _progress(len(refs), label) as progress:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ref] = get(ref, field.get(ref) if isinstance(field, dict) else field)
            except BaseException:
                for sibling in pending:
                    ray.cancel(sibling)
                raise
            progress.update(1)
    return [results[ref] for ref in refs]


def settle(refs: list, label: str) -> tuple[dict, dict]:
    """Waits for every task, with progress, whatever the others do: ({ref: result}, {ref: error}), the error
    being what the task raised (its cause, e.g. an InputError) or Ray's (a worker that died)."""
    results, errors = {}, {}
    pending = list(refs)
    with _progress(len(refs), label) as progress:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                errors[ref] = exc.cause
            except ray.exceptions.RayError as exc:
                errors[ref] = exc
            progress.update(1)
    return results, errors
