"""
YAML configuration files for C{twistd supernode}, C{twistd dfpeer} and
C{dfget}.

Design
======
  - A file holds defaults for the command line, nothing more: its keys are
    the long option names of the command (C{download-port}, C{proxy-rule};
    C{download_port} is accepted too), derived from the option parser
    itself, so an option added later has a key without any change here.
  - Flags given on the command line win over the file, and the file wins
    over the built-in defaults.  A repeatable option given on the command
    line replaces the file's whole list rather than adding to it.
  - Every value goes through the very code that handles the flag (the
    C{usage.Options} dispatch, the argparse C{type}), so the two cannot
    disagree about what is valid.  YAML numbers and strings are turned
    back into the text a flag would carry; booleans are only for flags;
    lists only for repeatable options and for the comma-separated ones a
    command names in C{comma_lists}.
  - Mistakes are usage errors naming the file and the key: an unknown key
    (with the closest known ones), a value of the wrong shape, a value the
    flag would refuse.
"""

import argparse
import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from twisted.python import usage

from dragonfly.options import integer

#: Keys no file may set: they are about the command line itself.
_NOT_KEYS = frozenset({"help", "version", "config"})

#: dfget options that name one download, not a default for all of them.
_DFGET_PER_RUN = frozenset({"url", "output"})

DFGET_SYSTEM_CONFIG = Path("/etc/dragonfly/dfget.yml")


class _StrictLoader(yaml.SafeLoader):
    """
    YAML's safe loader, refusing a key given twice in one mapping (plain
    YAML keeps the last one silently, hiding a mistake).
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class ConfigError(Exception):
    """
    A configuration file cannot be used; the message names the file and,
    where it applies, the key.
    """


def read_mapping(path: Path) -> dict[str, Any]:
    """
    Read a YAML file whose top level is a mapping of option names (empty
    file: no options), with C{_} and C{-} in names made equivalent.

    @return: the values by canonical name (with dashes).
    @raise ConfigError: if the file cannot be read, is not YAML, is not a
        mapping, or names one option twice.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of option names to values, got {_kind(data)}"
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not an option name")
        name = key.replace("_", "-")
        if name in values:
            raise ConfigError(f"{path}: {name} is given twice")
        values[name] = value
    return values


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _unknown(path: Path, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = (
        " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
        if close
        else " (see --help for the options)"
    )
    return ConfigError(f"{path}: unknown key {name!r}{hint}")


def _scalar(path: Path, name: str, value: object) -> str:
    """
    The text a flag would carry for a YAML scalar.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(
            f"{path}: {name}: expected a string or a number, got {_kind(value)}"
        )
    return str(value)


def _items(path: Path, name: str, value: object) -> list[str]:
    """
    The texts of a repeatable option's value: a YAML list or one scalar.
    """
    if isinstance(value, list):
        return [_scalar(path, f"{name}[{i}]", item) for i, item in enumerate(value)]
    return [_scalar(path, name, value)]


def _flag(path: Path, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {name}: expected true or false, got {_kind(value)}")
    return value


def _without_flag_prefix(name: str, message: str) -> str:
    """
    A flag handler's message without its C{--name:} lead, which the file's
    key replaces.
    """
    message = message.removeprefix("Parameter type enforcement failed: ")
    return re.sub(rf"^--{re.escape(name)}:?\s+", "", message)


# twistd plugins --------------------------------------------------------------


class ConfigOptions(usage.Options):
    """
    C{usage.Options} with a C{--config FILE} of defaults for every other
    option.

    Subclasses set L{config_default}, the file read when it exists and no
    C{--config} is given, and may name in L{comma_lists} the parameters
    that take comma-separated values, so the file can give them as lists.
    """

    config_default: str = ""
    comma_lists: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self["config"] = None
        self._given: set[str] = set()
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = self._recording(handler)

    def opt_config(self, path: str) -> None:
        """
        YAML file of defaults for these options (flags win; --config= none).
        """
        self["config"] = path

    def _recording(self, handler: Any) -> Any:
        """
        Wrap a dispatch entry to note which options the command line gave.
        """
        if isinstance(handler, usage.CoerceParameter):
            given = self._given

            class Recording(usage.CoerceParameter):
                def dispatch(self, parameterName: str, value: str) -> None:
                    given.add(parameterName)
                    super().dispatch(parameterName, value)

            return Recording(self, handler.coerce)

        def record(name: str, value: Any = None) -> Any:
            self._given.add(name)
            return handler(name, value)

        return record

    def parseArgs(self, *args: str) -> None:
        """
        Apply the configuration file: it runs after the command line's
        options and before C{postOptions}, which checks them together.
        """
        if args:
            raise usage.UsageError(f"unexpected arguments: {' '.join(args)}")
        given = set(self._given)
        path = self._config_path()
        if path is None:
            return
        try:
            self._apply(path, given)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _config_path(self) -> Path | None:
        chosen = self["config"]
        if chosen == "":
            return None
        if chosen is None:
            default = Path(self.config_default) if self.config_default else None
            return default if default is not None and default.is_file() else None
        path = Path(chosen)
        if not path.is_file():
            raise usage.UsageError(f"--config {chosen}: no such file")
        return path

    def option_names(self) -> list[str]:
        """
        The long option names a file may set.
        """
        return sorted(
            {n for n in self.synonyms.values() if len(n) > 1} - _NOT_KEYS,
        )

    def _apply(self, path: Path, given: set[str]) -> None:
        known = self.option_names()
        values = read_mapping(path)
        for name in values:
            if name not in known:
                raise _unknown(path, name, known)
        for name, value in values.items():
            if name in given:
                continue
            handler = self._dispatch[name]
            parameter = isinstance(handler, usage.CoerceParameter)
            try:
                if parameter and name in self.comma_lists:
                    handler.dispatch(name, ",".join(_items(path, name, value)))
                elif parameter:
                    handler.dispatch(name, _scalar(path, name, value))
                elif name + "=" in self.longOpt:
                    for item in _items(path, name, value):
                        handler(name, item)
                elif _flag(path, name, value):
                    handler(name, None)
            except usage.UsageError as e:
                reason = _without_flag_prefix(name, str(e))
                raise ConfigError(f"{path}: {name}: {reason}") from None


# dfget -----------------------------------------------------------------------


def dfget_config_path(home: Path, explicit: str | None) -> Path | None:
    """
    The file C{dfget} takes its defaults from: C{explicit} (the C{--config}
    flag, else C{$DFGET_CONFIG}; empty for none), else C{<home>/dfget.yml},
    else C{/etc/dragonfly/dfget.yml}, the first that exists.

    @raise ConfigError: when an explicitly named file does not exist.
    """
    if explicit is None:
        explicit = os.environ.get("DFGET_CONFIG")
    if explicit is not None:
        if explicit == "":
            return None
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return path
    for candidate in (home / "dfget.yml", DFGET_SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def _dfget_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """
    dfget's options a file may set, by long name.
    """
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                name = option[2:]
                if name not in _NOT_KEYS | _DFGET_PER_RUN:
                    actions[name] = action
    return actions


def _convert(action: argparse.Action, path: Path, name: str, text: str) -> Any:
    convert = action.type if action.type is not int else integer
    if convert is None:
        return text
    try:
        return convert(text)  # type: ignore[operator]
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {name}: {e}") from None


def dfget_file_values(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """
    The values of a dfget configuration file, converted as the flags'
    values are, by argparse destination.

    @raise ConfigError: for an unknown key or a bad value.
    """
    actions = _dfget_actions(parser)
    values = read_mapping(path)
    converted: dict[str, Any] = {}
    for name, value in values.items():
        action = actions.get(name)
        if action is None:
            raise _unknown(path, name, sorted(actions))
        if action.nargs == 0:
            if _flag(path, name, value):
                converted[action.dest] = action.const
        elif isinstance(action, argparse._AppendAction):
            converted[action.dest] = [
                _convert(action, path, name, item) for item in _items(path, name, value)
            ]
        else:
            converted[action.dest] = _convert(
                action, path, name, _scalar(path, name, value)
            )
    return converted


def _given_dests(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> set[str]:
    """
    The destinations the command line itself set: the same parser run
    again with every default suppressed.
    """
    saved = [(a, a.default, a.required) for a in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
            action.required = False
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    return set(vars(given))


def apply_dfget_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
) -> argparse.Namespace:
    """
    Fill in C{args} (C{dfget}'s parsed command line) from its configuration
    file where the command line left an option to its default.

    A bad file is a usage error (exit code 2), like a bad flag.
    """
    try:
        path = dfget_config_path(args.home, args.config)
        if path is None:
            return args
        values = dfget_file_values(parser, path)
    except ConfigError as e:
        parser.error(str(e))
    given = _given_dests(parser, argv)
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)
    return args


def add_dfget_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of defaults for these flags (default: $DFGET_CONFIG, "
        "else <home>/dfget.yml, else /etc/dragonfly/dfget.yml; flags win)",
    )
