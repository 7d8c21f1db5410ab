"""The plumbing every script shares, importing no project file (stdlib only).

- flags: ConfigError and parse_flags, the one --key=value parser of prepare.py, dhrd.py and bench.py
  (JSON config files as positional arguments, values typed like their defaults)
- atomic_write: a file goes to a temporary sibling, is fsynced, then one rename; replace_dir and
  recover_dir do the same for a folder (two renames, and the repair of a kill between them)
- Progress: the progress line of long work on stderr (downloads, teachers, evaluation)
"""
import difflib
import errno
import json
import os
import shutil
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

# a full disk, a quota, a failing disk: the write cannot succeed as it is, so its temporary goes (a multi-GB
# ckpt.pt.tmp would keep the disk full); any other error (a download cut off) leaves it to resume from
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class WriteError(OSError):
    """A file could not be written for a full disk or an I/O error; the message names it and what was kept."""


def fsync(path):
    """Flush a file's data, or a folder's entries (a rename is durable only once its folder is), to the disk.
    Folders cannot be opened on Windows, and a few file systems refuse to sync one (EINVAL): skipped."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL or not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def disk_error(e, path, tmp):
    """-> the WriteError for OSError e of writing path via tmp (now removed), or None for other errors."""
    if e.errno not in DISK_ERRORS:
        return None
    return WriteError(f"{path}: cannot be written ({os.strerror(e.errno)}); the partial {tmp.name} was "
                      f"removed and the {path.name} there before, if any, is intact: free space on that disk "
                      "(or write elsewhere) and run the command again")


def atomic_write(path, write, suffix=".tmp"):
    """write(tmp) fills tmp, a sibling named path + suffix; tmp is fsynced, replaces path in one rename, and
    the folder is fsynced: after a kill or a power loss a reader finds the old file or the whole new one.
    A full disk or an I/O error removes tmp and raises WriteError; any other error leaves tmp (a download
    resumes from its .part; the next write simply overwrites a stale .tmp)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as e:
        error = disk_error(e, path, tmp)
        if error is None:
            raise
        tmp.unlink(missing_ok=True)
        raise error from None
    return path


def _siblings(path):
    """(path.tmp, path.old): a folder being written, and the previous version during a replace_dir."""
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def begin_dir(path):
    """-> path.tmp, a new empty folder to fill and then hand to replace_dir(path); first recover_dir(path)
    repairs what an earlier, killed swap left (its path.tmp may be the only whole copy)."""
    path = Path(path)
    recover_dir(path)
    tmp, _ = _siblings(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(path):
    """The complete folder path.tmp (begin_dir) takes path's place: its files and itself fsynced, then path ->
    path.old, path.tmp -> path (a folder cannot replace a full one in one rename), path.old removed. A kill
    between the renames leaves no path but a whole path.tmp: recover_dir finishes the swap."""
    path = Path(path)
    tmp, old = _siblings(path)
    for folder, _, files in os.walk(tmp):
        for f in files:
            fsync(Path(folder, f))
        fsync(folder)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path):
    """What a killed replace_dir or folder write left beside path: no path but a path.old means the swap was
    cut between its renames, when path.tmp was already whole: it becomes path. With path in place, a path.tmp
    is an unfinished write and a path.old the version replaced: both go."""
    path = Path(path)
    tmp, old = _siblings(path)
    if not path.exists() and old.exists():
        os.replace(tmp if tmp.exists() else old, path)
        fsync(path.parent)
    if path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
