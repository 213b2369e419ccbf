"""Declarative per-stem chain presets: ``presets/chains/NAME.toml`` -> ``ChainPreset`` -> ``StemChain``.

A preset says, per stem of a separation, which pedalboard effects to run, the gain, or mute::

    description = "Lo-fi vocals over a slightly lowered band"   # one line for `unbake chains`
    model = "htdemucs"               # optional: the model (or preset) the chain is made for, used
                                     #   when the caller names none (an explicit -n wins)
    requires_stems = ["vocals"]      # optional: stems the model must have (else an error naming them)
    others = "pass"                  # stems not listed under [stems]: "pass" (default), "mute", or a
                                     #   table like a stem's: [others] gain_db = -3.0
    [stems.vocals]                   # one table per stem, by the model's stem name
    gain_db = 6.0                    # optional: a number of dB, -100..100, after the chain (default 0)
    mute = false                     # optional: true for silence (then no chain nor gain_db)
    [[stems.vocals.chain]]           # optional: pedalboard plugins, in order
    plugin = "Reverb"                # a built-in pedalboard effect class name
    room_size = 0.6                  # its constructor parameters (`help(pedalboard.Reverb)`)

Parameter values: numbers for float parameters (finite; frequencies > 0; LFO rates up to 100 Hz,
``Resample`` up to 768 kHz), true/false for bool
ones, the member name as a string for enum ones (``mode = "HPF12"`` for ``LadderFilter``), and for
a ``*_filename`` parameter (``Convolution``'s impulse response) a path, relative to the preset's folder.
Only pedalboard's built-in effects are allowed: no ``VST3Plugin``/``AudioUnitPlugin`` (external
code), no containers (``Pedalboard``, ``Chain``, ``Mix``): a preset is a plain series per stem.

Validation happens at load, before any audio is processed or any daemon contacted: a TOML syntax
error, an unknown key, a wrong type, an unknown plugin or parameter, a value pedalboard refuses, each
is one ``ChainError`` whose one-line message names the file and the key, e.g.
``presets/chains/bad.toml: stems.vocals.chain[0].plugin: unknown pedalboard plugin 'Reverbb' (did you
mean Reverb?)`` (``chain[i]`` counts from 0). Stems are checked against the model's once it is known
(``ChainPreset.mapping``): a listed stem the model lacks, or a missing ``requires_stems``, is a
``ChainError`` too.

Where presets are found (``load_chain(NAME)``): the folders in ``$UNBAKE_CHAINS`` (os.pathsep-separated),
first, then ``CHAINS_DIR`` (the shipped ``presets/chains``); a user preset shadows a shipped one of
the same name. A path (with a ``/`` or ending ``.toml``) is loaded as it is.

Torch-free: tomllib, difflib, pedalboard (imported on first use); ``StemChain`` and ``Client`` are
imported only by ``stem_chain``.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.errors import BadRequest

__all__ = ["ChainError", "ChainPreset", "StemSpec", "CHAINS_DIR", "ChainTrack", "chain_file", "load_chain", "list_chains",
           "allowed_plugins", "resolve_stems"]

CHAINS_DIR = Path(__file__).resolve().parents[1] / "presets" / "chains"
GAIN_DB_RANGE = (-100.0, 100.0)
# Finite values pedalboard takes but cannot render: JUCE's Phaser and Chorus LFOs are specified below
# 100 Hz (at 1.6e15 Hz a Phaser's render never returned), and Resample to 10 MHz ran for minutes or
# ran out of memory. (Values that only give NaN or inf, e.g. a filter's gain of 1e7 dB, are caught
# on the audio by ChainTrack, with the stem named.)
PARAM_LIMITS = {"rate_hz": (0.0, 100.0, "Hz"), "target_sample_rate": (1.0, 768000.0, "Hz")}
TOP_KEYS = ("description", "model", "requires_stems", "others", "stems")
STEM_KEYS = ("gain_db", "mute", "chain")
_REFUSED = ("Plugin", "PluginContainer", "Chain", "Mix", "Pedalboard", "ExternalPlugin", "IIRFilter",
            "VST3Plugin", "AudioUnitPlugin")


class ChainError(BadRequest):
    """A chain preset that cannot be used (code E_BAD_REQUEST); the message is one line naming the
    file, the key (``stems.vocals.chain[0].room_size``) and the problem. Line breaks and other control
    characters from the document (a key named ``"0\\n"``) are shown escaped, so it stays one line."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- pedalboard plugins -------------------------------------------------------------------------

@lru_cache(maxsize=1)
def allowed_plugins() -> dict[str, type]:
    """{class name: class} of pedalboard's built-in effects a preset may name (no external
    plugins, no containers, no abstract bases)."""
    import pedalboard
    out = {}
    for name in dir(pedalboard):
        cls = getattr(pedalboard, name)
        if (name.startswith("_") or name in _REFUSED or not isinstance(cls, type)
                or not issubclass(cls, pedalboard.Plugin)
                or issubclass(cls, (pedalboard.PluginContainer, pedalboard.ExternalPlugin))):
            continue
        out[name] = cls
    return out


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets: pybind signatures hold Union[a, b] and <Mode.X: 0>."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


@lru_cache(maxsize=None)
def plugin_parameters(cls: type) -> dict[str, tuple[str, bool]]:
    """{parameter: (type as pybind writes it, required)} from the plugin's constructor signature."""
    doc = (cls.__init__.__doc__ or "").strip().splitlines()
    m = re.match(r"__init__\((.*)\)\s*->\s*None\s*$", doc[0] if doc else "")
    if not m:
        return {}
    out = {}
    for arg in _split_top(m.group(1))[1:]:  # the first is self
        name, _, rest = arg.partition(":")
        kind, eq, _default = rest.partition(" = ")
        out[name.strip()] = (kind.strip(), not eq)
    return out


def _enum_type(kind: str):
    import pedalboard
    obj: Any = pedalboard
    for part in kind.split(".")[1:]:  # pedalboard_native.LadderFilter.Mode
        obj = getattr(obj, part, None)
    return obj if obj is not None and hasattr(obj, "__members__") else None


def _convert(kind: str, name: str, value: Any, base_dir: Path) -> Any:
    """A TOML value as the constructor wants it; raises ValueError with the problem."""
    if kind in ("float", "Optional[float]"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if (name.endswith("frequency_hz") or name == "cutoff_hz" or name.endswith("sample_rate")) and value <= 0:
            raise ValueError(f"must be > 0 Hz, got {value!r}")
        if name in PARAM_LIMITS:
            lo, hi, unit = PARAM_LIMITS[name]
            if not lo <= value <= hi:
                raise ValueError(f"must be from {lo:g} to {hi:g} {unit}, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_show(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {_show(value)}")
        return value
    if kind == "str" or kind.startswith("Union[str"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a non-empty string, got {_show(value)}")
        if name.endswith("_filename"):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise ValueError(f"no such file {str(path)!r}")
            return str(path)
        return value
    enum = _enum_type(kind)
    if enum is not None:
        members = list(enum.__members__)
        if not isinstance(value, str) or value not in enum.__members__:
            raise ValueError(f"must be one of {', '.join(members)}, got {_show(value)}"
                             + (_suggest(value, members) if isinstance(value, str) else ""))
        return enum.__members__[value]
    raise ValueError(f"parameters of type {kind} cannot be set from a preset")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _build_plugin(name: str, params: dict, base_dir: Path, where: str, path: Path):
    """A fresh pedalboard plugin; ChainError naming the key that is wrong."""
    classes = allowed_plugins()
    if not isinstance(name, str):
        raise ChainError(f"{path}: {where}.plugin: must be a pedalboard plugin class name, got {_show(name)}")
    if name not in classes:
        import pedalboard
        if isinstance(getattr(pedalboard, name, None), type):
            raise ChainError(f"{path}: {where}.plugin: {name!r} is not allowed in a chain preset (only "
                             f"pedalboard's built-in effects, in series: {', '.join(sorted(classes))})")
        raise ChainError(f"{path}: {where}.plugin: unknown pedalboard plugin {name!r}{_suggest(name, classes)}")
    cls = classes[name]
    sig = plugin_parameters(cls)
    kwargs = {}
    for key, value in params.items():
        if key not in sig:
            known = ", ".join(sig) or "none"
            raise ChainError(f"{path}: {where}.{key}: {name} has no parameter {key!r}"
                             f"{_suggest(key, sig)} (its parameters: {known})")
        try:
            kwargs[key] = _convert(sig[key][0], key, value, base_dir)
        except ValueError as e:
            raise ChainError(f"{path}: {where}.{key}: {e}") from None
    missing = [k for k, (_, required) in sig.items() if required and k not in kwargs]
    if missing:
        raise ChainError(f"{path}: {where}.{missing[0]}: {name} needs parameter {missing[0]!r}")
    ordered = {k: kwargs[k] for k in sig if k in kwargs}
    try:
        return cls(**ordered)
    except Exception:
        pass
    prefix: dict = {}  # the first parameter, in signature order, that pedalboard refuses
    for key, value in ordered.items():
        prefix[key] = value
        try:
            cls(**prefix)
        except Exception as e:
            raise ChainError(f"{path}: {where}.{key}: {params[key]!r} is refused by {name}: {_first_line(e)}") from None
    raise ChainError(f"{path}: {where}: pedalboard cannot make {name} from these parameters")


# -- the preset ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StemSpec:
    """What happens to one stem: ``plugins`` ((class name, {parameter: TOML value}), ...) in
    series, then ``gain_db``; ``mute`` gives silence."""
    plugins: tuple[tuple[str, dict], ...] = ()
    gain_db: float = 0.0
    mute: bool = False

    @property
    def passes(self) -> bool:
        return not (self.plugins or self.gain_db or self.mute)

    def to_dict(self) -> dict:
        return {"mute": self.mute, "gain_db": self.gain_db,
                "chain": [{"plugin": n, **p} for n, p in self.plugins]}


@dataclass(frozen=True)
class ChainPreset:
    """A validated chain preset (see the module docstring for the file format).

    name (the file name without .toml), path, description, model (str | None), requires_stems
    (tuple[str]), others (StemSpec for stems not listed), stems ({stem: StemSpec}), sha256 (hex of
    the file's bytes).
    """
    name: str
    path: Path
    description: str = ""
    model: str | None = None
    requires_stems: tuple[str, ...] = ()
    others: StemSpec = field(default_factory=StemSpec)
    stems: dict[str, StemSpec] = field(default_factory=dict)
    sha256: str = ""

    @property
    def others_mode(self) -> str:
        """'pass', 'mute', or 'chain' (a table with plugins or gain)."""
        return "mute" if self.others.mute else "pass" if self.others.passes else "chain"

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "description": self.description,
                "model": self.model, "requires_stems": list(self.requires_stems),
                "others": self.others_mode if self.others_mode != "chain" else self.others.to_dict(),
                "stems": {s: spec.to_dict() for s, spec in self.stems.items()}, "sha256": self.sha256}

    def board(self, spec: StemSpec, where: str = "stems"):
        """A fresh ``pedalboard.Pedalboard`` for ``spec``'s plugins."""
        import pedalboard
        return pedalboard.Pedalboard([
            _build_plugin(n, p, self.path.parent, f"{where}.chain[{i}]", self.path)
            for i, (n, p) in enumerate(spec.plugins)])

    def boards(self, stems: list[str] | None = None) -> dict[str, Any]:
        """Fresh pedalboard objects: ``{stem: Pedalboard}`` for each stem with plugins (the listed
        ones; with ``stems``, also those that get ``others``' plugins)."""
        names = list(self.stems) if stems is None else [s for s in stems if self._spec(s).plugins]
        return {s: self.board(self._spec(s), f"stems.{s}" if s in self.stems else "others")
                for s in names if self._spec(s).plugins}

    def _spec(self, stem: str) -> StemSpec:
        return self.stems.get(stem, self.others)

    def check_stems(self, stems: list[str], model: str | None = None) -> None:
        """Raise ChainError if the model's ``stems`` lack one of ``requires_stems`` or a listed stem."""
        what = f"model {model}" if model else "the model"
        has = f"(its stems: {', '.join(stems)})"
        for s in self.requires_stems:
            if s not in stems:
                hint = f"; the chain is made for {self.model}" if self.model and self.model != model else ""
                raise ChainError(f"{self.path}: requires_stems: {what} has no stem {s!r} {has}{hint}")
        for s in self.stems:
            if s not in stems:
                raise ChainError(f"{self.path}: stems.{s}: {what} has no stem {s!r}{_suggest(s, stems)} {has}")

    def mapping(self, stems: list[str], model: str | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        """``(chains, gains_db)`` for ``StemChain`` given the model's ``stems``: a muted stem maps to
        None, a stem with plugins to a fresh Pedalboard, a passing stem is left out; gains_db has the
        non-zero gains. Raises ChainError (``check_stems``)."""
        self.check_stems(list(stems), model)
        chains: dict[str, Any] = {}
        gains: dict[str, float] = {}
        for s in stems:
            spec = self._spec(s)
            if spec.mute:
                chains[s] = None
                continue
            if spec.plugins:
                chains[s] = self.board(spec, f"stems.{s}" if s in self.stems else "others")
            if spec.gain_db:
                gains[s] = spec.gain_db
        return chains, gains

    def stem_chain(self, client=None, model: str | None = None, *, stems: list[str] | None = None,
                   **options):
        """A ``StemChain`` running this preset. model: None -> the preset's ``model``, else the
        daemon's default. stems: the model's stems, if known; None -> asked of the daemon
        (``resolve_stems``: one session opened and cancelled, which also loads the model).
        client: a ``Client`` (None: ``Client()``, closed with the StemChain). options: session
        options (segment_s, overlap, shifts, two_stems, ...).
        Raises ChainError (stems), the client's errors (EngineUnavailable, ModelError, ...)."""
        from .stemchain import StemChain
        model = model or self.model
        chain = StemChain({}, model, client=client, **options)
        try:
            if stems is None:
                model, stems = resolve_stems(chain.client, model, **options)
            chain.chains, chain.gains_db = self.mapping(list(stems), model)
        except BaseException:
            chain.close()
            raise
        chain.model = model
        return chain


def resolve_stems(client, model: str | None, **options) -> tuple[str, list[str]]:
    """(model name, stems) as the daemon will separate: a session opened (44.1 kHz stereo) and
    cancelled. Handles the default model (None) and ``two_stems``. Raises the client's errors."""
    session = client.open(model, 44100, 2, **{k: v for k, v in options.items() if v is not None})
    try:
        return session.model, list(session.stems)
    finally:
        try:
            session.cancel()
        except Exception:
            pass


# -- parsing ------------------------------------------------------------------------------------

def _check_keys(table: dict, known: tuple[str, ...], where: str, path: Path) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else str(key)
            raise ChainError(f"{path}: {name}: unknown key{_suggest(key, known)} (keys: {', '.join(known)})")


def _stem_spec(table: Any, where: str, path: Path) -> StemSpec:
    if not isinstance(table, dict):
        raise ChainError(f"{path}: {where}: must be a table (gain_db, mute, chain), got {_show(table)}")
    _check_keys(table, STEM_KEYS, where, path)
    mute = table.get("mute", False)
    if not isinstance(mute, bool):
        raise ChainError(f"{path}: {where}.mute: must be true or false, got {_show(mute)}")
    gain = table.get("gain_db", 0.0)
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
        raise ChainError(f"{path}: {where}.gain_db: must be a finite number of dB, got {_show(gain)}")
    lo, hi = GAIN_DB_RANGE
    if not lo <= gain <= hi:
        raise ChainError(f"{path}: {where}.gain_db: must be within {lo:g}..{hi:g} dB (mute = true for "
                         f"silence), got {gain!r}")
    chain = table.get("chain", [])
    if not isinstance(chain, list):
        raise ChainError(f"{path}: {where}.chain: must be an array of tables ([[{where}.chain]]), got {_show(chain)}")
    if mute and ("chain" in table or "gain_db" in table):
        extra = "chain" if "chain" in table else "gain_db"
        raise ChainError(f"{path}: {where}.{extra}: a muted stem has no {extra} (drop one of mute, {extra})")
    plugins = []
    for i, entry in enumerate(chain):
        at = f"{where}.chain[{i}]"
        if not isinstance(entry, dict):
            raise ChainError(f"{path}: {at}: must be a table with plugin = \"Name\", got {_show(entry)}")
        if "plugin" not in entry:
            raise ChainError(f"{path}: {at}.plugin: missing (plugin = \"Reverb\", ...)")
        params = {k: v for k, v in entry.items() if k != "plugin"}
        _build_plugin(entry["plugin"], params, path.parent, at, path)  # validates, then dropped
        plugins.append((entry["plugin"], params))
    return StemSpec(tuple(plugins), float(gain), mute)


def parse_chain(data: dict, path: Path, name: str | None = None, sha256: str = "") -> ChainPreset:
    """A ``ChainPreset`` from parsed TOML ``data``; every problem is a ChainError naming ``path``."""
    path = Path(path)
    _check_keys(data, TOP_KEYS, "", path)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ChainError(f"{path}: description: must be a string, got {_show(description)}")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ChainError(f"{path}: model: must be a model or preset name, got {_show(model)}")
    req = data.get("requires_stems", [])
    if not isinstance(req, list) or not all(isinstance(s, str) and s for s in req):
        raise ChainError(f"{path}: requires_stems: must be an array of stem names, got {_show(req)}")
    others = data.get("others", "pass")
    if isinstance(others, str):
        if others not in ("pass", "mute"):
            raise ChainError(f"{path}: others: must be \"pass\", \"mute\" or a table like a stem's, "
                             f"got {others!r}{_suggest(others, ('pass', 'mute'))}")
        others_spec = StemSpec(mute=others == "mute")
    elif isinstance(others, dict):
        others_spec = _stem_spec(others, "others", path)
    else:
        raise ChainError(f"{path}: others: must be \"pass\", \"mute\" or a table, got {_show(others)}")
    stems = data.get("stems", {})
    if not isinstance(stems, dict):
        raise ChainError(f"{path}: stems: must be a table of stems ([stems.vocals]), got {_show(stems)}")
    specs = {}
    for stem, table in stems.items():
        if not stem.strip():
            raise ChainError(f"{path}: stems.{stem!r}: a stem name must not be empty")
        specs[stem] = _stem_spec(table, f"stems.{stem}", path)
    return ChainPreset(name or path.stem, path, description.strip(), model, tuple(dict.fromkeys(req)),
                       others_spec, specs, sha256)


def load_file(path: Path) -> ChainPreset:
    """Read and validate one preset file; ChainError naming it for any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ChainError(f"{path}: no such chain preset file") from None
    except OSError as e:
        raise ChainError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ChainError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ChainError(f"{path}: TOML syntax error: {_first_line(e)}") from None
    return parse_chain(data, path, path.stem, hashlib.sha256(raw).hexdigest())


def search_dirs() -> list[Path]:
    """Where names are looked up, in order: $UNBAKE_CHAINS's folders, then CHAINS_DIR."""
    user = [Path(p).expanduser() for p in os.environ.get("UNBAKE_CHAINS", "").split(os.pathsep) if p]
    return [*user, CHAINS_DIR]


def _preset_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in search_dirs():
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
                found.setdefault(f.stem, f)
    return found


def load_chain(name_or_path: str | os.PathLike) -> ChainPreset:
    """A validated preset by name (see ``search_dirs``) or by path (a Path, or a str with a path
    separator or ending in .toml). Raises ChainError (unknown name, unreadable file, invalid)."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text or text.endswith(".toml"):
        return load_file(Path(text))
    files = _preset_files()
    if text not in files:
        known = ", ".join(sorted(files)) or "none"
        raise ChainError(f"no chain preset {text!r}{_suggest(text, files)}; known: {known} (or give the "
                         f"path of a .toml file)")
    return load_file(files[text])


def list_chains(on_error=None) -> list[ChainPreset]:
    """Every preset found (user folders shadow shipped names), sorted by name. A bad file raises its
    ChainError, or, with ``on_error(err)``, is reported there and skipped."""
    out = []
    for _, f in sorted(_preset_files().items()):
        try:
            out.append(load_file(f))
        except ChainError as e:
            if on_error is None:
                raise
            on_error(e)
    return out


# -- a chain over a file (`unbake separate --chain`, `unbake remix`, `unbake bounce --chain`) -----------

class ChainTrack:
    """An ``engine.stemfiles.Track`` that runs a ``StemChain`` over the whole file at ``close``
    (offline, reset=True): the processed stems (``keep_stems``) and their sum, ``remix``."""

    def __init__(self, chain, stems: list[str], sample_rate: int, where: str, keep_stems: bool = True):
        if "remix" in stems:
            raise BadRequest("the model has a stem named 'remix': it would collide with the remix file")
        self.chain, self.sample_rate, self.where = chain, sample_rate, where
        self.stems = [*stems, "remix"] if keep_stems else ["remix"]
        self.blocks: list = []
        self.frames = 0

    def push(self, block):
        from engine import audio
        self.blocks.append(audio.validate(block, self.where, self.frames, self.sample_rate))
        self.frames += block.shape[-1]
        return {}

    def close(self):
        import numpy as np
        from engine.errors import BadAudio
        x, self.blocks = np.concatenate(self.blocks, axis=1), []
        stems = self.chain.process_stems(x, self.sample_rate)
        remix = np.zeros_like(x)
        for stem, y in stems.items():
            if not np.isfinite(y).all():
                raise BadAudio(f"{self.where}: the chain of stem {stem!r} gave NaN or Inf samples (a plugin "
                               f"parameter that does not suit {self.sample_rate} Hz?)")
            remix += y
        out = {s: stems[s] for s in self.stems if s != "remix"}
        out["remix"] = remix
        return out


def chain_file(client, preset, path, model, stems, dests, fmt, progress, options):
    """One file through ``preset`` into ``dests`` ({stem: path}, with ``remix``); a TrackReport."""
    from engine.stemfiles import write_track

    def open_track(sample_rate, channels, where):
        chain = preset.stem_chain(client, model, stems=stems, **options)
        return ChainTrack(chain, stems, sample_rate, where, keep_stems=set(dests) != {"remix"})

    return write_track(Path(path), dests, fmt, open_track, progress=progress)
