"""Flag parsing shared by the entry points: every flag or config mistake is one line."""
from __future__ import annotations

import sys

from absl import flags


def parse_flags(program: str):
  """An absl `flags_parser` for `app.run` that reports mistakes as `PROGRAM: error: ...`.

  An unknown `--config.KEY` makes ml_collections raise AttributeError / KeyError from inside
  the parser, and a config file that raises (e.g. an unknown `file.py:variant`) arrives as a
  flags.Error whose text ends with the file's traceback: both would print pages by default.
  """
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"{program}: error: {_last_line(str(e))}")
    except (AttributeError, KeyError) as e:
      while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
        e = e.args[0]
      key = "; ".join(str(e.args[0] if e.args else e).splitlines())  # 'key' [; Did you mean ...]
      given = " ".join(a for a in argv[1:] if a.startswith("--config."))
      sys.exit(f"{program}: error: unknown config key {key} in {given} "
               "(the --config file and cacl_jax/defaults.py list every key)")
    except (TypeError, ValueError) as e:
      sys.exit(f"{program}: error: bad --config override: {e}")
  return parse


def _last_line(text: str) -> str:
  """The exception line at the end of a message that quotes a traceback."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)
