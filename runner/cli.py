"""The command line around Hydra: verbatim prompts and clean stops on signals.

Prompts. Hydra's override grammar gives `,` `(` `)` `'` `[` `]` `{` `}` `=` and `${...}` meanings,
so `prompt=...` takes only text that fits it. `--prompt TEXT` (or `--prompt=TEXT`) takes any text
verbatim: it becomes an override quoted and escaped here, so it also reaches Slurm/submitit jobs,
which get the overrides. A `prompt=...` that the grammar rejects, or that would be interpolated
(`${...}`), is refused with the way to pass it instead of a parser traceback or a silently changed prompt.

Signals. SIGINT, SIGTERM (what torchrun and Slurm send at teardown) and SIGUSR1 (Slurm's warning
before the time limit, `--signal=B:USR1@T`; in a Hydra Slurm sweep also submitit's, runner/requeue.py)
raise `Interrupted` in the main thread, so every
`finally` runs (temporary files are removed) and the CLI ends with one line and exit code 128 + the
signal number. While the sampling loop can stop at a step checkpoint (`deferred_stops`, runner/
checkpoint.py), a stop signal is only noted (`pending_stop`): the loop stops at an agreed step
boundary and writes a checkpoint first.
"""

from __future__ import annotations

import contextlib
import re
import signal

from runner.config import UserError

_FLAG = "--prompt"
# An interpolation that OmegaConf would resolve: '${' not escaped by a backslash.
_INTERPOLATION = re.compile(r"(?<!\\)\$\{")


def quote_prompt(text: str) -> str:
    """The override `prompt='...'` whose value, after Hydra and OmegaConf, is exactly `text`."""
    # OmegaConf: a literal '${' is written '\${', and backslashes right before it double.
    s = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra's quoted string: a quote gets a backslash; backslashes before a quote or at the end double.
    s = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", s)
    s = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, s)
    return f"prompt='{s}'"


def _check_prompt_override(arg: str, multirun: bool) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    advice = ('pass the text verbatim with --prompt "..." (any characters), or write it in a prompts file '
              "(prompts_file=FILE, read verbatim)")
    try:
        override = OverridesParser.create().parse_override(arg)
        value = override.value()
    except HydraException:
        raise UserError(f"{arg!r} is not valid in Hydra's override grammar (it gives , ( ) ' [ ] {{ }} = and "
                        f"${{...}} meanings); {advice}.") from None
    if override.is_sweep_override() and not multirun:  # "a, b" is a sweep over two prompts in Hydra's grammar
        raise UserError(f"{arg!r} is a list of prompts to sweep over in Hydra's override grammar (the comma); "
                        f"{advice}.")
    if isinstance(value, str) and _INTERPOLATION.search(value):
        raise UserError(f"{arg!r} contains ${{...}}, which Hydra would replace (e.g. ${{oc.env:HOME}} becomes "
                        f"your home directory); {advice}.")


def cache_fields(name: str) -> tuple[str, list[str]] | None:
    """(config class name, its fields) of the named cache config conf/cache/NAME.yaml, or None."""
    import dataclasses
    import os

    from omegaconf import OmegaConf

    from runner.cache import CONFIGS
    from runner.config import CONF_DIR, cache_schema

    path = os.path.join(CONF_DIR, "cache", f"{name}.yaml")
    if not os.path.isfile(path):
        return None
    defaults = [d for d in OmegaConf.load(path).get("defaults", []) if isinstance(d, str)]
    for cls in CONFIGS:
        if cache_schema(cls) in defaults:
            return cls.__name__, [f.name for f in dataclasses.fields(cls)]
    return None


def _check_cache_override(arg: str, cache: str) -> None:
    """A `cache.KEY=` override must name a field of the chosen policy's config."""
    key = arg.split("=", 1)[0].split(".", 1)[1].lstrip("+")
    found = cache_fields(cache)
    if found is None or key.split(".")[0] in found[1]:
        return
    cls, fields = found
    raise UserError(f"{arg.split('=', 1)[0]} is not a setting of cache={cache} ({cls}); its settings are: "
                    f"{', '.join(fields)}.")


def hydra_overrides(argv: list[str]) -> list[str]:
    """argv with every `--prompt TEXT` / `--prompt=TEXT` turned into a quoted override; plain
    `prompt=` overrides are checked, and so are `cache.KEY=` overrides against the chosen policy's
    config (its fields named in the error). Raises UserError."""
    out: list[str] = []
    multirun = "-m" in argv or "--multirun" in argv
    caches = [a.split("=", 1)[1] for a in argv if a.startswith("cache=")]
    cache = caches[-1] if caches and "," not in caches[-1] else "none"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == _FLAG:
            if i + 1 >= len(argv):
                raise UserError('--prompt needs the text after it: --prompt "a red circle moves left".')
            out.append(quote_prompt(argv[i + 1]))
            i += 2
            continue
        if arg.startswith(_FLAG + "="):
            out.append(quote_prompt(arg[len(_FLAG) + 1:]))
        elif arg.startswith("prompt="):
            _check_prompt_override(arg, multirun)
            out.append(arg)
        elif arg.startswith("cache.") and "=" in arg:
            _check_cache_override(arg, cache)
            out.append(arg)
        else:
            out.append(arg)
        i += 1
    return out


class Interrupted(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class _Stops:
    deferring = False  # inside deferred_stops()
    pending: int | None = None  # the first stop signal noted while deferring
    signals: tuple[int, ...] = STOP_SIGNALS  # those stop_on_signals() handles


def ignore_stops() -> None:
    """Ignore further stop signals: the process is ending on the first one."""
    for s in _Stops.signals:
        signal.signal(s, signal.SIG_IGN)


def _on_stop_signal(signum, frame) -> None:
    if _Stops.deferring:
        # No printing here: the main thread may be inside a write to the same stream.
        if _Stops.pending is None:
            _Stops.pending = signum
        return
    # Later signals are ignored while the first one's cleanup runs; the process ends right after.
    ignore_stops()
    raise Interrupted(signum)


def stop_on_signals(extra: tuple[int, ...] = ()) -> None:
    """SIGINT, SIGTERM, SIGUSR1 and `extra` (submitit's preemption signal, runner/requeue.py) raise
    Interrupted in the main thread (call from the main thread)."""
    _Stops.signals = tuple(dict.fromkeys((*STOP_SIGNALS, *extra)))
    for s in _Stops.signals:
        signal.signal(s, _on_stop_signal)


@contextlib.contextmanager
def deferred_stops(enabled: bool = True):
    """While active (and enabled), a stop signal is noted for `pending_stop()` instead of raised."""
    before = _Stops.deferring
    _Stops.deferring = before or enabled
    try:
        yield
    finally:
        _Stops.deferring = before


def pending_stop() -> int | None:
    """The stop signal noted while deferring, if any (it stays noted until the process ends)."""
    return _Stops.pending
