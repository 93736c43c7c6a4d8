"""The `--help` layout of every command: each option's default beside it.

argparse's own ArgumentDefaultsHelpFormatter also prints "(default: None)" and repeats
defaults a help text already states; this one shows a default only where it says something.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # A flag (store_true/store_false: nargs 0) has its destination's default, not one of its own.
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and action.nargs != 0
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text
