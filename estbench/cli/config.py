"""``estbench run --config sweep.yml``: a whole sweep in a YAML file (benchopt's ``--config``).

The file is a mapping whose keys are the ``run`` subcommand's long options, spelt with ``_`` or
``-`` (``n_samples``, ``cell-timeout``); the keys accepted are read from the argparse parser, so a
new flag is accepted in a file as soon as it exists.  Values are what the flag takes: a string or a
number, ``true`` / ``false`` for a switch (``force``, ``quiet``, ``json``), and a string or a list for
the options that take a comma-separated list (``tasks``, ``estimators``, ``seeds``).  Paths are read
from the current directory, as on the command line.

The file's options are parsed as if typed before the command line's own, so a flag given on the
command line overrides the file (argparse keeps the last value).  Bad input -- an unreadable file,
invalid YAML, an unknown key, a value of the wrong type -- is a :class:`UsageError` naming the file:
one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import collections.abc
import difflib
from pathlib import Path

from estbench.core.errors import UsageError

#: the options whose value is a comma-separated list: a file may give them as a YAML list
LIST_OPTIONS = ("tasks", "estimators", "seeds")
#: options a file cannot set: a file naming another file would be a chain to follow
_NOT_IN_A_FILE = ("help", "config")


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of the subcommand ``name`` (argparse keeps it in its subparsers action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def config_keys(run_parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a sweep file may use -- each long option of ``run_parser`` without its ``--`` and
    with ``_`` for ``-`` -- and the argparse action of each."""
    keys = {}
    for action in run_parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in _NOT_IN_A_FILE:
            keys[longs[0][2:].replace("-", "_")] = action
    return keys


def read_config(path) -> dict:
    """The mapping in the YAML file ``path``; UsageError naming it when it cannot be read, is not
    YAML, or is not a mapping of options."""
    try:
        import yaml
    except ImportError:
        raise UsageError("--config needs PyYAML, which is not installed: "
                         "pip install 'estbench[parallel]' (or pip install PyYAML)") from None
    where = f"sweep config {path}"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        config = yaml.load(text, Loader=_unique_key_loader(yaml))
    except _DuplicateKey as exc:
        raise UsageError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"{where} is not valid YAML: {' '.join(str(problem).split())}{at}") from None
    if config is None:
        raise UsageError(f"{where} is empty: give the run options as 'key: value' lines "
                         "(see examples/sweep.yml)")
    if not isinstance(config, dict):
        raise UsageError(f"{where} must be a mapping of run options ('key: value' lines), "
                         f"not {_described(config)}")
    return config


class _DuplicateKey(Exception):
    pass


def _unique_key_loader(yaml):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the
    last silently: a sweep file edited twice must not run with the value the reader missed)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, collections.abc.Hashable):
                    break  # the safe loader's own error says so
                if key in seen:
                    raise _DuplicateKey(f"{key} is given twice (lines {seen[key]} and "
                                        f"{key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _described(value) -> str:
    """A YAML value as a message names it: its kind and what it was."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads yes/no/on/off as true/false: quote a word)"
    kind = {int: "number", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} {value!r}"


def _scalar_text(value, key: str, where: str) -> str:
    """A string or a number as the command line would hold it; UsageError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        hint = " (leave the key out for the default)" if value is None else ""
        raise UsageError(f"{where}: {key} must be a string or a number, got {_described(value)}"
                         f"{hint}")
    return str(value)


def config_arguments(config: dict, run_parser: argparse.ArgumentParser, where: str) -> list[str]:
    """The file's options as ``run`` arguments (``--key=value``, ``--switch``), checked against
    the parser's options, their types and their choices."""
    keys = config_keys(run_parser)
    seen: dict = {}
    argv = []
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{where}: unknown key {raw_key!r}{hint}; the keys are run's long "
                             f"options: {', '.join(keys)}")
        if key in seen:
            raise UsageError(f"{where}: {key} is given twice ({seen[key]!r} and {raw_key!r})")
        seen[key] = raw_key
        action = keys[key]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # a switch: store_true and its kin
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} is a switch: true or false, got "
                                 f"{_described(value)}")
            if value:
                argv.append(flag)
            continue
        if isinstance(value, list):
            if key not in LIST_OPTIONS:
                raise UsageError(f"{where}: {key} takes one value, got a list {value!r}")
            if not value:
                raise UsageError(f"{where}: {key} is an empty list: name at least one (leave the "
                                 "key out for the default)")
            text = ",".join(_scalar_text(v, f"each item of {key}", where) for v in value)
        else:
            text = _scalar_text(value, key, where)
        if action.type is not None:
            try:
                action.type(text)
            except (TypeError, ValueError):
                wanted = {int: "an integer", float: "a number"}.get(action.type, "valid")
                raise UsageError(f"{where}: {key} must be {wanted}, got {value!r}") from None
        if action.choices is not None and text not in action.choices:
            raise UsageError(f"{where}: {key} must be one of {', '.join(map(str, action.choices))}, "
                             f"got {value!r}")
        argv.append(f"{flag}={text}")  # '=': a value starting with '-' stays a value
    return argv


def apply(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace,
          command: str = "run") -> argparse.Namespace:
    """``args`` parsed again with the options of the file ``args.config`` inserted after the
    subcommand, before the command line's own flags, which therefore win.  The file's options, as
    read, are kept in ``args.config_options`` (the run's metadata records them)."""
    run_parser = _subcommand_parser(parser, command)
    config = read_config(args.config)
    inserted = config_arguments(config, run_parser, f"sweep config {args.config}")
    at = argv.index(command) + 1
    again = parser.parse_args([*argv[:at], *inserted, *argv[at:]])
    again.config_options = config
    return again
