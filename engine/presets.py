"""Separation presets: ``presets/separation/NAME.toml`` -> ``Preset`` -> ``Plan`` (what to open).

Torch-free (tomllib, engine.protocol, engine.weights): the client and ``unbake presets`` use it.
A preset is one of three kinds::

    description = "One line for `unbake presets`"

    # 1. one model
    model = "htdemucs"                 # a catalog name (or a --repo model)
    [options]                          # session options (engine.protocol.OPTION_TYPES), used unless
    shifts = 1                         #   the caller sets the same option

    # 2. an ensemble (engine.ensemble.EnsembleTrack)
    algorithm = "avg"                  # "avg" | "median" | "max_spec" | "min_spec"
    n_fft = 2048                       # optional, max_spec/min_spec: STFT size and hop at the
    hop = 512                          #   client's rate (hop must divide n_fft; n_fft / hop >= 2)
    [[members]]
    model = "htdemucs"
    weight = 1.0                       # one weight for every stem (default 1), or per stem:
    weights = { vocals = 2.0, drums = 0.0 }   # a stem not listed gets `weight`; 0 leaves it out
    rename = { no_vocals = "instrumental" }   # optional: member stem -> ensemble stem
    options = { segment_s = 7.8 }      # optional: this member's session options (two_stems too)

    # 3. the first installed of an ordered list of presets
    candidates = ["vocals-hq", "4stem", "fast"]
    [candidate_options.fast]           # optional: extra options when that candidate is the one used
    shifts = 1

    # any kind, optional:
    two_stems = "vocals"               # STEM and no_STEM (the sum of the others)
    residual = true                    # stems sum exactly to the input: true (complement stem,
                                       #   engine.ensemble.residual_target) or a stem name

A preset name is accepted wherever a model name is (``-n/--name``, the daemon's ``open``); a
catalog model name always means the model (a preset file may not take a catalog name).
Errors are one ``BadRequest`` line naming the file and the key.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol as P
from . import weights
from .errors import BadRequest, UnbakeError

__all__ = ["Member", "Preset", "Plan", "PRESETS_DIR", "ENV_DIRS", "ALGORITHMS", "load_preset",
           "list_presets", "is_preset", "resolve", "installed", "missing_files", "parse_preset"]

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets" / "separation"
ENV_DIRS = "UNBAKE_SEPARATION_PRESETS"
ALGORITHMS = ("avg", "median", "max_spec", "min_spec")
TOP_KEYS = ("description", "model", "options", "members", "algorithm", "n_fft", "hop", "candidates",
            "candidate_options", "two_stems", "residual")
MEMBER_KEYS = ("model", "weight", "weights", "rename", "options")
DEFAULT_N_FFT, DEFAULT_HOP = 2048, 512
# Options an ensemble applies to the combination, never to its members.
ENSEMBLE_LEVEL = ("two_stems", "residual")


@dataclass(frozen=True)
class Member:
    model: str
    weight: float = 1.0
    weights: dict = field(default_factory=dict)     # stem -> weight (others: `weight`)
    rename: dict = field(default_factory=dict)      # member stem -> ensemble stem
    options: dict = field(default_factory=dict)

    def weight_of(self, stem: str) -> float:
        """Weight of the member's stem (after rename) ``stem``."""
        return float(self.weights.get(stem, self.weight))


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str = ""
    members: tuple = ()                 # Member...; one member without algorithm: a single model
    algorithm: str | None = None        # None: a single model
    n_fft: int = DEFAULT_N_FFT
    hop: int = DEFAULT_HOP
    options: dict = field(default_factory=dict)
    candidates: tuple = ()              # preset names (kind 3)
    candidate_options: dict = field(default_factory=dict)
    two_stems: str | None = None
    residual: bool | str = False

    @property
    def models(self) -> list[str]:
        return [m.model for m in self.members]


@dataclass(frozen=True)
class Plan:
    """What a name resolves to: the preset used (``preset``; None for a bare model) and what to open."""
    name: str                           # the name asked for (output folder, ``ready.model``)
    preset: str | None
    members: tuple                      # Member...
    algorithm: str | None               # None: one model, no ensemble
    n_fft: int = DEFAULT_N_FFT
    hop: int = DEFAULT_HOP
    options: dict = field(default_factory=dict)    # the preset's session options
    caller: dict = field(default_factory=dict)     # the caller's, which win over any preset's

    @property
    def ensemble(self) -> bool:
        return self.algorithm is not None

    @property
    def session_options(self) -> dict:
        return {**self.options, **self.caller}


# -- parsing --------------------------------------------------------------------------------------

def _fail(where: str, key: str, msg: str):
    raise BadRequest(f"{where}: {key}: {msg}")


def _check_options(value, where: str, key: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, key, f"must be a table, got {type(value).__name__}")
    try:
        return P.check_options(dict(value), f"{where}: {key}")
    except UnbakeError as e:
        raise BadRequest(str(e)) from None


def _check_residual(value, where: str, key: str):
    if not isinstance(value, (bool, str)) or (isinstance(value, str) and not value):
        _fail(where, key, "must be true/false or a stem name")
    return value


def parse_preset(text: str, name: str, where: str) -> Preset:
    """Parse and validate one preset's TOML. Raises BadRequest('WHERE: KEY: problem')."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadRequest(f"{where}: TOML syntax error: {e}") from None
    for key in data:
        if key not in TOP_KEYS:
            _fail(where, key, f"unknown key; keys: {', '.join(TOP_KEYS)}")
    if name in weights.catalog():
        _fail(where, "name", f"{name!r} is a catalog model name; name the preset otherwise")
    description = data.get("description", "")
    if not isinstance(description, str):
        _fail(where, "description", "must be a string")
    kinds = [k for k in ("model", "members", "candidates") if k in data]
    if len(kinds) != 1:
        _fail(where, "model", "a preset has exactly one of model, members, candidates"
              + (f" (has {', '.join(kinds)})" if kinds else ""))
    options = _check_options(data.get("options", {}), where, "options")
    two_stems = data.get("two_stems")
    if two_stems is not None and (not isinstance(two_stems, str) or not two_stems):
        _fail(where, "two_stems", "must be a stem name")
    residual = _check_residual(data.get("residual", False), where, "residual")
    kw: dict = dict(name=name, path=Path(where), description=description, options=options,
                    two_stems=two_stems, residual=residual)
    if "model" in data:
        if not isinstance(data["model"], str) or not data["model"]:
            _fail(where, "model", "must be a model name")
        for key in ("algorithm", "n_fft", "hop", "candidate_options"):
            if key in data:
                _fail(where, key, "only for an ensemble (members) or candidates")
        kw["members"] = (Member(model=data["model"]),)
        return Preset(**kw)
    if "candidates" in data:
        cands = data["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c for c in cands):
            _fail(where, "candidates", "must be a non-empty list of preset names")
        if name in cands:
            _fail(where, "candidates", f"lists the preset itself ({name!r})")
        copts = data.get("candidate_options", {})
        if not isinstance(copts, dict):
            _fail(where, "candidate_options", "must be a table of tables")
        for c, o in copts.items():
            if c not in cands:
                _fail(where, f"candidate_options.{c}", "is not among the candidates")
            copts[c] = _check_options(o, where, f"candidate_options.{c}")
        for key in ("algorithm", "n_fft", "hop"):
            if key in data:
                _fail(where, key, "only for an ensemble (members)")
        return Preset(candidates=tuple(cands), candidate_options=copts, **kw)
    # an ensemble
    algorithm = data.get("algorithm")
    if algorithm not in ALGORITHMS:
        _fail(where, "algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    n_fft, hop = data.get("n_fft", DEFAULT_N_FFT), data.get("hop", DEFAULT_HOP)
    for key, v in (("n_fft", n_fft), ("hop", hop)):
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 65536:
            _fail(where, key, "must be an integer in [2, 65536]")
    if n_fft % hop or n_fft // hop < 2:
        _fail(where, "hop", f"must divide n_fft ({n_fft}) at least twice")
    raw = data["members"]
    if not isinstance(raw, list) or not raw:
        _fail(where, "members", "must be a non-empty array of tables ([[members]])")
    members = []
    for i, m in enumerate(raw):
        at = f"members[{i}]"
        if not isinstance(m, dict):
            _fail(where, at, "must be a table")
        for key in m:
            if key not in MEMBER_KEYS:
                _fail(where, f"{at}.{key}", f"unknown key; keys: {', '.join(MEMBER_KEYS)}")
        model = m.get("model")
        if not isinstance(model, str) or not model:
            _fail(where, f"{at}.model", "must be a model name")
        weight = m.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < 1e6:
            _fail(where, f"{at}.weight", "must be a number >= 0")
        ws = m.get("weights", {})
        if not isinstance(ws, dict):
            _fail(where, f"{at}.weights", "must be a table stem = weight")
        for stem, w in ws.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < 1e6:
                _fail(where, f"{at}.weights.{stem}", "must be a number >= 0")
        rename = m.get("rename", {})
        if not isinstance(rename, dict) or not all(isinstance(v, str) and v for v in rename.values()):
            _fail(where, f"{at}.rename", "must be a table member_stem = \"ensemble_stem\"")
        mopts = _check_options(m.get("options", {}), where, f"{at}.options")
        if "residual" in mopts:
            _fail(where, f"{at}.options.residual", "residual applies to the ensemble: set it at the top")
        members.append(Member(model=model, weight=float(weight), weights={k: float(v) for k, v in ws.items()},
                              rename=dict(rename), options=mopts))
    if len(members) < 2:
        _fail(where, "members", "an ensemble needs at least 2 members (or use model = ...)")
    if algorithm == "median" and len(members) < 3:
        _fail(where, "algorithm", "median needs at least 3 members (with 2 it is avg)")
    return Preset(members=tuple(members), algorithm=algorithm, n_fft=n_fft, hop=hop, **kw)


# -- finding presets ------------------------------------------------------------------------------

def _dirs() -> list[Path]:
    extra = [Path(d) for d in os.environ.get(ENV_DIRS, "").split(os.pathsep) if d]
    return extra + [PRESETS_DIR]


def _path_for(name: str) -> Path | None:
    # Names only, never paths: the daemon resolves names its clients send (a user's own presets go
    # in a folder of $UNBAKE_SEPARATION_PRESETS).
    if not name or name.startswith(".") or "/" in name or os.sep in name or name.endswith(".toml"):
        return None
    for d in _dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return path
    return None


def is_preset(name: str | None) -> bool:
    """True when ``name`` is a preset (and not a catalog model)."""
    return bool(name) and name not in weights.catalog() and _path_for(name) is not None


def load_preset(name: str) -> Preset:
    """A preset by name: the folders in $UNBAKE_SEPARATION_PRESETS first, then presets/separation."""
    path = _path_for(name)
    if path is None:
        raise BadRequest(f"unknown preset {name!r}; presets: {', '.join(p.name for p in list_presets())}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"{path}: cannot read: {e}") from None
    return parse_preset(text, path.stem, str(path))


def list_presets() -> list[Preset]:
    """Every preset found (a user one shadows a shipped one of the same name), by name."""
    found: dict[str, Path] = {}
    for d in _dirs():
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            found.setdefault(path.stem, path)
    return [parse_preset(p.read_text(), n, str(p)) for n, p in sorted(found.items())]


# -- installation ---------------------------------------------------------------------------------

def _model_installed(model: str, repo=None) -> bool:
    spec = weights.catalog().get(model)
    if spec is not None:
        return weights.is_installed(spec, repo)
    root = weights.repo_dir(repo)
    return (root / f"{model}.yaml").is_file() or bool(list(root.glob(f"{model}-*.th")))


def _chosen(preset: Preset, repo=None, _seen=()) -> Preset:
    """A candidates preset's first installed candidate (else its last), resolved recursively."""
    if not preset.candidates:
        return preset
    if preset.name in _seen:
        raise BadRequest(f"{preset.path}: candidates: a cycle through {preset.name!r}")
    loaded = [_chosen(load_preset(c), repo, _seen + (preset.name,)) for c in preset.candidates]
    for c in loaded:
        if all(_model_installed(m, repo) for m in c.models):
            return c
    return loaded[-1]


def installed(preset: Preset | str, repo=None) -> bool:
    """Whether every model the preset would use now has its weights installed."""
    p = load_preset(preset) if isinstance(preset, str) else preset
    return all(_model_installed(m, repo) for m in _chosen(p, repo).models)


def missing_files(preset: Preset | str, repo=None) -> list[tuple[str, int]]:
    """(model, bytes) that ``unbake fetch`` would download for the preset (for a candidates
    preset: for its first candidate), catalog models only."""
    p = load_preset(preset) if isinstance(preset, str) else preset
    while p.candidates:
        p = load_preset(p.candidates[0])
    out = []
    for m in dict.fromkeys(p.models):
        spec = weights.catalog().get(m)
        if spec is not None and not weights.is_installed(spec, repo):
            out.append((m, spec.size))
    return out


# -- resolution -----------------------------------------------------------------------------------

def resolve(name: str, options: dict | None = None, repo=None) -> Plan:
    """A model or preset name and the caller's session options -> the Plan to open.

    Precedence, lowest first: the chosen preset's ``two_stems``/``residual``/``options``, the top
    preset's ``candidate_options`` for it, the top preset's own, a member's ``options`` (for that
    member), the caller's options (``Plan.caller``). A bare model name is a one-member Plan."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if not is_preset(name):
        return Plan(name=name, preset=None, members=(Member(model=name),), algorithm=None, caller=options)
    top = load_preset(name)
    chosen = _chosen(top, repo)
    merged: dict = {}
    if chosen.two_stems is not None:
        merged["two_stems"] = chosen.two_stems
    if chosen.residual:
        merged["residual"] = chosen.residual
    merged.update(chosen.options)
    merged.update(top.candidate_options.get(chosen.name, {}))
    if top is not chosen:  # the top preset's own options/two_stems/residual over the candidate's
        if top.two_stems is not None:
            merged["two_stems"] = top.two_stems
        if top.residual:
            merged["residual"] = top.residual
        merged.update(top.options)
    return Plan(name=name, preset=chosen.name, members=chosen.members, algorithm=chosen.algorithm,
                n_fft=chosen.n_fft, hop=chosen.hop, options=merged, caller=options)
