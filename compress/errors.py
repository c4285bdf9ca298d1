"""The exceptions a user sees: one-line messages the CLI prints without a traceback."""

from __future__ import annotations

from collections.abc import Callable, Mapping


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line (no traceback) and exits 2.

    `field` is the library's name of the setting at fault (e.g. "target_flops"); `fields` lists
    every setting the message names (`field` first). The message writes each as `name` in
    backticks, so the library speaks of its own names and a front end can show its own (the CLI
    renders `target_flops` as --target-flops) without the library knowing about flags.
    """

    def __init__(self, message: str, *, field: str | None = None, fields: tuple[str, ...] = ()):
        self.template = message
        self.field = field
        self.fields = tuple(dict.fromkeys(((field,) if field else ()) + tuple(fields)))
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = lambda f: f) -> str:
        """The message with every named field written as `name(field)`."""
        text = self.template
        for f in self.fields:
            text = text.replace(f"`{f}`", name(f))
        return text

    def renamed(self, names: Mapping[str, str]) -> UserError:
        """The same error, with fields called as a caller that wraps this API calls them."""
        text = self.template
        for old, new in names.items():
            text = text.replace(f"`{old}`", f"`{new}`")
        new_fields = tuple(names.get(f, f) for f in self.fields)
        return type(self)(text, field=names.get(self.field, self.field) if self.field else None, fields=new_fields)


class TrainingInterrupted(Exception):
    """Ctrl-C: a resumable checkpoint was written."""


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf: the last good checkpoint is kept."""
