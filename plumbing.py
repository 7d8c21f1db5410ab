"""The plumbing every script shares, importing no project file (stdlib only).

- flags: ConfigError and parse_flags, the one --key=value parser of prepare.py, dhrd.py and bench.py
  (JSON config files as positional arguments, values typed like their defaults)
- atomic_write: a file goes to a temporary sibling, then one rename
- Progress: the progress line of long work on stderr (downloads, teachers, evaluation)
"""
import difflib
import json
import os
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# --key=value flags: the one parser of every script

class ConfigError(ValueError):
    """A bad flag, value or config file; the message names the flag or file and says how to fix it."""


BOOLS = {"true": True, "1": True, "false": False, "0": False}   # any case; anything else is an error


def flag_value(key, value, defaults, choices, where):
    """One value for `key`, checked against its default: text (from the command line) becomes the default's
    type; a JSON int is a fine float; a None default takes a string. choices[key]: for a str key the only
    values allowed; for a bool/int/float key extra strings allowed besides its type (alpha: a float, or
    "auto"). `where` names the flag or file in the message."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: unknown config key '{key}'{hint} (keys: {', '.join(defaults)})")
    default = defaults[key]
    kind = str if default is None else type(default)
    allowed = tuple((choices or {}).get(key, ()))
    if kind is not str and isinstance(value, str) and value in allowed:
        return value
    v = value
    if isinstance(value, str) and kind is bool:
        v = BOOLS.get(value.lower())
    elif isinstance(value, str) and kind in (int, float):
        try:
            v = kind(value)
        except ValueError:
            pass
    if kind is float and type(v) is int:
        v = float(v)
    if type(v) is not kind and not (default is None and v is None):
        if kind is bool:
            extra = "; use true, false, 1 or 0 (any case)"
        elif allowed:
            extra = f"; or use {' or '.join(allowed)}"
        else:
            extra = ""
        raise ConfigError(f"{where}: expected {kind.__name__} for {key} (like {default!r}), "
                          f"got {value!r}{extra}")
    if kind is str and allowed and v not in allowed:
        raise ConfigError(f"{where}: {key}={v!r} is not one of {', '.join(allowed)}")
    return v


def read_config_file(path):
    """A JSON config file: one object {"key": value}. A key that starts with "_" is a note for the reader
    (JSON has no comments: a preset cites its sources that way), never a setting; parse_flags skips it."""
    if not Path(path).is_file():
        raise ConfigError(f"argument '{path}': use --key=value, or give the path of a JSON config file "
                          f"(there is no file '{path}')")
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a config file is one JSON object {{\"key\": value}}")
    return obj


def parse_flags(argv, defaults, choices=None):
    """--key=value flags and JSON config files (positional; their "_" keys are notes), applied in order,
    later wins.
    defaults: {key: default value}, whose types the values follow (flag_value has the rules).
    -> {key: value} of the keys that were set; the caller lays them over its defaults.
    Raises ConfigError naming the flag or file."""
    values = {}
    for a in argv:
        if not a.startswith("--"):
            for key, value in read_config_file(a).items():
                if key.startswith("_"):
                    continue
                values[key] = flag_value(key, value, defaults, choices, a)
            continue
        key, eq, value = a[2:].partition("=")
        if not eq:
            raise ConfigError(f"argument '{a}': use --key=value")
        values[key] = flag_value(key, value, defaults, choices, f"--{key}")
    return values


# ----------------------------------------------------------------------------------------------------------
# files and progress

def atomic_write(path, write, suffix=".tmp"):
    """write(tmp) fills tmp, a sibling named path + suffix; then tmp replaces path in one rename, so a reader
    sees the old file or the whole new one, never a part. If write raises, path is untouched and tmp stays
    (download resumes from its .part; the next write simply overwrites a stale .tmp)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    os.replace(tmp, path)
    return path


def _duration(seconds):
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """The progress of `total` units of work on stderr: done/total (%), how many an earlier run already did
    (a resumed download or teacher), rate, ETA. On a terminal one line updated in place with \r; elsewhere
    (a log file, CI) a plain line at each further 10 % and at least every `every` seconds, so logs stay
    readable. Work that ends within `delay` seconds prints nothing. total None: unknown (no Content-Length).
    Use as a context manager, or call close(): the final state, and the newline a terminal needs."""

    delay = 2.0   # seconds of silence at the start: short work stays quiet
    every = 30.0  # a log line at least this often, also between the 10 % marks
    redraw = 0.2  # a terminal's line is redrawn at most this often

    def __init__(self, label, total, done=0, unit="", scale=1, quiet=False, stream=None):
        self.label = label
        self.total = total
        self.done = done
        self.start = done  # done by an earlier run: counted, but not in the rate
        self.unit = unit  # " MB" with scale 1e6: bytes shown as megabytes
        self.scale = scale
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.last = None  # when a line was last written, None: not yet
        self.shown = None  # the `done` that line showed
        self.width = 0  # of the terminal line, to blank what a shorter one leaves

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _amount(self, n):
        if self.scale == 1:
            return str(n)
        return f"{n / self.scale:.1f}"

    def line(self):
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        text = f"{self.label}: {self._amount(self.done)}"
        if self.total:
            text += f"/{self._amount(self.total)}{self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += self.unit
        if self.start:
            text += f", {self._amount(self.start)}{self.unit} from an earlier run"
        rate = (self.done - self.start) / elapsed
        text += f", {rate / self.scale:.1f}{self.unit}/s"
        if self.total and rate > 0:
            text += f", ETA {_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def _write(self, now):
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last = now
        self.shown = self.done

    def _decile(self, n):
        return int(10 * n / self.total) if self.total else 0

    def update(self, done):
        self.done = done
        now = time.monotonic()
        if self.quiet or now - self.t0 < self.delay:
            return
        if self.last is None:
            self._write(now)
        elif self.tty and now - self.last >= self.redraw:
            self._write(now)
        elif not self.tty and self._decile(done) > self._decile(self.shown):
            self._write(now)
        elif not self.tty and now - self.last >= self.every:
            self._write(now)

    def close(self):
        if self.last is None:  # nothing shown: short work, or quiet
            return
        if self.shown != self.done:
            self._write(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.last = None
