"""``unbake bounce``: batch renders for DAW scripts. Files in; stems (+ a remix with a chain) and a
sidecar JSON per input out; resumable, atomic, one failed input never stops the others.

Torch-free (numpy, pyzmq, pedalboard, the engine's torch-free modules). The pieces, in order::

    expand_inputs(args, lists)  ->  [Input]        files, folders (searched recursively), globs, list files
    plan(inputs, ...)           ->  [Job]          output paths per input, collisions kept apart
    bounce_one(job, client, ...) -> Result         skip if is_done(...), else separate + write + sidecar
    run(args, settings)         ->  [Result]       probe the model, plan, bounce with --jobs threads

The command line (its flags, ``Settings`` from them, ``cmd_bounce``) is ``plugin_bridge.cli.bounce``;
this module never imports the CLI.

Decisions (README "Batch renders" says the same for users):

- **Inputs.** A folder is searched recursively for audio files (``AUDIO_EXTS``, any case), skipping
  hidden files and folders (so temporaries such as ``.vocals.x1y2z3w4.partial.wav`` are never
  inputs) and anything under the output folder. A glob (``*``, ``?``, ``[``; ``**`` recursive) keeps
  the audio files it matches and searches the folders it matches. A file named as it is is taken
  whatever its extension. A list file (``--list FILE``, ``-`` for stdin, or an argument ending in
  ``LIST_EXTS``) holds one entry a line, or several separated by ``;`` (REAPER's RENDER_TARGETS);
  blank lines and ``#`` lines are skipped, relative entries are relative to the list's folder, and
  each entry may itself be a file, folder or glob. The same file named twice is bounced once.
- **Output names.** Stems go to ``OUT/MODEL/<template>`` (``OUT/MODEL+CHAIN/<template>`` with a
  chain, so that different chains never overwrite each other), template variables ``track``,
  ``trackext``, ``stem``, ``ext`` (as ``unbake separate``) plus ``parent`` (the input's folder name).
  ``{track}`` is the file name without extension; when several inputs of one run share it (every song
  of a MUSDB-style tree is ``mixture.wav``), it becomes ``<parent>-<name>`` for those (more folder
  names if needed: ``<grandparent>-<parent>-<name>``), so the default ``{track}/{stem}.{ext}`` keeps
  them apart. That name depends on which inputs are bounced together; put ``{parent}`` in
  ``--filename`` for names that never do. The remix (with a chain) is the stem ``remix``; the sidecar
  is the template with ``stem=bounce, ext=json`` (``{track}/bounce.json``; ``.json`` is appended when
  the template fixes another extension). Two inputs that would still write the same path both fail.
- **Sidecar** (``presets/schemas/bounce-sidecar.schema.json``): written last, to a temp file and
  ``os.replace``d, so its presence means every output it lists is complete.
- **Input identity: sha256 of the input file** (size and mtime_ns are recorded too, for people). A
  DAW re-rendering a file in place within one mtime tick, or a copy that keeps the mtime, cannot
  fool it; it costs one read of each input per run (~0.1 s for 40 MB; the separation reads it again
  from the page cache). An input that changes while it is bounced fails (size or mtime moved).
- **Resume.** An input is skipped when its sidecar parses, has this schema version, and records the
  same input sha256, model name, weights sha256, chain (name + sha256 of the preset file), options
  (session options + output format), the same output paths, and each output is intact: present,
  the recorded size, and the recorded mtime_ns or else the recorded sha256 (rsync's quick check;
  ``--verify`` hashes every output). The engine version is recorded, not compared.
- **Temp files.** Stems are written to ``.STEM.XXXXXXXX.partial.EXT`` beside their destination
  (``engine.stemfiles.StemWriter``), the sidecar to ``.bounce.json.XXXXXXXX.partial``. After a
  SIGKILL these stay behind; each run deletes those of the destinations it plans (before checking
  or bouncing an input). Two bounces writing the same outputs at the same time are not supported.
- **latency_samples** is 0: offline output is aligned with the input (same length and start).
- **--jobs N**: N threads, each with its own ``Client`` (a zmq socket is not thread-safe); the
  daemon interleaves their sessions. Output is the same as with one job.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.errors import BadAudio, BadRequest, EngineUnavailable, ProtocolError, UnbakeError

__all__ = ["Input", "Job", "Result", "Settings", "Context", "expand_inputs", "read_list", "track_names", "plan",
           "is_done", "bounce_one", "prepare", "check_run", "plan_run", "progress_line", "run", "format_summary"]

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif")
LIST_EXTS = (".txt", ".lst", ".list", ".m3u", ".m3u8")
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
SCHEMA_ID = "unbake-bounce-sidecar/1"
SIDECAR_STEM = "bounce"
REMIX_STEM = "remix"
_TEMP_RAND = "[a-z0-9_]{8}"  # tempfile.mkstemp's random part
_UMASK = os.umask(0o022)  # read once, at import (single-threaded): os.umask is process-wide
os.umask(_UMASK)


# -- inputs -------------------------------------------------------------------------------------

@dataclass
class Input:
    """One input: ``source`` (str, the path as the user named it or as found under a folder/glob),
    ``path`` (absolute, resolved Path; None when nothing was found), ``error`` (str, why not)."""
    source: str
    path: Path | None
    error: str | None = None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTS


def _under(path: Path, folders: Iterable[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _excludes_for(root: Path, exclude: list[Path]) -> list[Path]:
    """The folders of ``exclude`` that apply below ``root``: not those that hold ``root`` itself
    (``bounce . -o .`` still searches ``.``, skipping ``./MODEL``)."""
    root = root.resolve()
    return [x for x in exclude if not (root == x or x in root.parents)]


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = []
    for part in Path(pattern).parts:
        if _is_glob(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _search(folder: Path, shown: str, exclude: list[Path]) -> list[tuple[str, Path]]:
    """(shown path, resolved path) of the audio files under ``folder``, recursively, sorted by
    path; hidden names and anything under the folders ``exclude`` skipped."""
    exclude = _excludes_for(folder, exclude)
    found = []
    visited = {folder.resolve()}
    for root, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = Path(root, d).resolve()
            if not d.startswith(".") and not _under(real, exclude) and real not in visited:
                visited.add(real)  # symlinked folders are followed, each real folder once (no cycles)
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            p = Path(root, name)
            if name.startswith(".") or not _is_audio(p):
                continue
            real = p.resolve()
            if not _under(real, exclude):
                found.append((os.path.join(shown, os.path.relpath(p, folder)), real))
    return sorted(found)


def read_list(path: str | os.PathLike) -> list[str]:
    """The entries of a list file (``-``: stdin): one a line or several separated by ``;``;
    whitespace and surrounding double quotes stripped, blank lines and ``#`` lines skipped, relative
    entries joined to the list file's folder. Raises BadRequest (unreadable list)."""
    text_path = os.fspath(path)
    try:
        if text_path == "-":
            text, base = sys.stdin.read(), ""
        else:
            with open(text_path, encoding="utf-8-sig", errors="surrogateescape") as f:
                text = f.read()
            base = os.path.dirname(text_path)
    except OSError as e:
        raise BadRequest(f"{text_path}: cannot read the list file ({e.strerror or e})") from None
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for part in line.split(";"):
            entry = part.strip().strip('"').strip()
            if entry:
                entry = os.path.expanduser(entry)
                out.append(entry if os.path.isabs(entry) else os.path.join(base, entry))
    return out


def expand_inputs(args: Iterable[str], *, lists: Iterable[str] = (), exclude: Iterable[Path] = ()) -> list[Input]:
    """The inputs named by ``args`` (files, folders, globs, list files: the module docstring says how
    each is read) and by the list files ``lists``, in order, each file once.

    exclude: folders whose files are never inputs when found by a folder search or a glob (the
    output folder and its model folder), except those that hold the folder searched (or the
    glob's fixed part) itself. Never raises for a bad entry: it becomes an ``Input`` with ``error`` set
    ("no such file or folder", "no audio files in folder", "no file matches"); an unreadable list
    file is one such Input too.
    """
    exclude = [Path(x).resolve() for x in exclude]
    out: list[Input] = []
    seen: set[Path] = set()
    entries: list[str] = []
    named = [(a, Path(a).suffix.lower() in LIST_EXTS and Path(a).is_file()) for a in args]
    for lst, is_list in [*named, *((str(x), True) for x in lists)]:
        if not is_list:
            entries.append(lst)
            continue
        try:
            entries += read_list(lst)
        except BadRequest as e:
            out.append(Input(str(lst), None, str(e).split(": ", 1)[-1]))

    def add(shown: str, real: Path) -> None:
        if real not in seen:
            seen.add(real)
            out.append(Input(shown, real))

    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = _search(p, entry, exclude)
            if not found:
                out.append(Input(entry, None, "no audio files in folder"))
            for shown, real in found:
                add(shown, real)
        elif p.is_file():
            add(entry, p.resolve())
        elif p.exists() and not _is_glob(entry):  # a named pipe, a socket, a device: say which
            try:
                from engine.inputs import input_stat
                input_stat(p)
            except BadAudio as e:
                out.append(Input(entry, None, str(e).split(": ", 1)[-1]))
        elif _is_glob(entry):
            matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
            skip = _excludes_for(_glob_root(os.path.expanduser(entry)), exclude)
            found = []
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found += _search(mp, m, exclude)
                elif mp.is_file() and _is_audio(mp) and not _under(mp.resolve(), skip):
                    found.append((m, mp.resolve()))
            if not found:
                out.append(Input(entry, None, "no audio file matches"))
            for shown, real in found:
                add(shown, real)
        else:
            out.append(Input(entry, None, "no such file or folder"))
    return out


# -- planning -----------------------------------------------------------------------------------

@dataclass
class Job:
    """What one input becomes: ``track`` (the ``{track}`` value), ``dests`` ({stem: Path}),
    ``remix`` (Path, or None without a chain), ``sidecar`` (Path); ``error`` (str) when it cannot
    be bounced (the input was not found, or its paths collide with another input's)."""
    input: Input
    track: str = ""
    dests: dict[str, Path] = field(default_factory=dict)
    remix: Path | None = None
    sidecar: Path | None = None
    error: str | None = None

    @property
    def outputs(self) -> dict[str, Path]:
        """{stem: Path} plus {"remix": Path} with a chain: every audio file the job writes."""
        return {**self.dests, **({REMIX_STEM: self.remix} if self.remix is not None else {})}


def track_names(paths: list[Path]) -> dict[Path, str]:
    """{path: track name}: the file name without extension, or, for names several paths share
    (compared case-insensitively), ``<parent>-<name>`` with as few folder names as keep them apart
    (then the extension too: ``<parents>-<name>-<ext>``)."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.stem.casefold(), []).append(p)
    names: dict[Path, str] = {}
    for group in groups.values():
        if len(group) == 1:
            names[group[0]] = group[0].stem
            continue
        depth = max(len([q for q in p.parent.parts if q not in ("/", "")]) for p in group)

        def name(p: Path, k: int, ext: bool = False) -> str:
            parents = [q for q in p.parent.parts if q not in ("/", "")][-k:] if k else []
            return "-".join([*parents, p.stem] + ([p.suffix.lstrip(".")] if ext else []))
        for k in range(1, depth + 1):
            cand = [name(p, k) for p in group]
            if len({c.casefold() for c in cand}) == len(cand):
                break
        else:
            cand = [name(p, depth, ext=True) for p in group]
        names.update(zip(group, cand))
    return names


def _sidecar_path(out_root: Path, path: Path, track: str, template: str, variables: dict) -> Path:
    rel = template.format(**{**variables, "track": track, "trackext": path.suffix.lstrip("."),
                             "stem": SIDECAR_STEM, "ext": "json"})
    if not rel.endswith(".json"):
        rel += ".json"
    return out_root / rel


def plan(inputs: list[Input], out_dir: Path, model_dir: str, stems: list[str], fmt, *,
         template: str = DEFAULT_TEMPLATE, remix: bool = False) -> list[Job]:
    """One Job per input: ``out_dir/model_dir/<template>`` for each of ``stems`` (and the remix when
    ``remix``), and the sidecar path (see the module docstring).

    fmt: ``engine.stemfiles.OutputFormat``. model_dir: ``MODEL`` or ``MODEL+CHAIN``.
    Raises BadRequest for a template that is wrong for every input (unknown variable, several stems
    on one path, a stem on the sidecar's path, a model with a stem named ``remix`` under a chain);
    inputs whose paths collide with another's get ``error`` instead.
    """
    from engine.stemfiles import stem_paths
    if remix and REMIX_STEM in stems:
        raise BadRequest(f"the model has a stem named {REMIX_STEM!r}; the remix of a chain needs that name")
    out_dir = Path(out_dir).resolve()
    found = [i.path for i in inputs if i.path is not None]
    names = track_names(found)
    jobs: list[Job] = []
    owner: dict[Path, int] = {}
    clashes: dict[int, int] = {}
    for inp in inputs:
        job = Job(inp)
        jobs.append(job)
        if inp.path is None:
            job.error = inp.error or "no such file or folder"
            continue
        variables = {"parent": inp.path.parent.name}
        job.track = names[inp.path]
        all_stems = [*stems, *([REMIX_STEM] if remix else [])]
        paths = stem_paths(out_dir, model_dir, inp.path, all_stems, fmt, template, track_name=job.track,
                           variables=variables)
        job.dests = {s: paths[s] for s in stems}
        job.remix = paths.get(REMIX_STEM) if remix else None
        job.sidecar = _sidecar_path(out_dir / model_dir, inp.path, job.track, template, variables)
        if job.sidecar in paths.values():
            raise BadRequest(f"--filename {template!r}: the sidecar {job.sidecar.name} has a stem's path; "
                             f"use {{stem}} and {{ext}}")
        for p in [*paths.values(), job.sidecar]:
            key = Path(os.path.normcase(p))
            if key in owner and owner[key] != len(jobs) - 1:
                clashes[len(jobs) - 1] = owner[key]
                clashes.setdefault(owner[key], len(jobs) - 1)
            owner.setdefault(key, len(jobs) - 1)
    for i, j in clashes.items():
        jobs[i].error = (f"its outputs collide with those of {jobs[j].input.source}; put {{track}} or "
                         f"{{parent}} in --filename")
    return jobs


# -- files --------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (engine.weights.sha256_of, imported here so that building the
    CLI's parser does not load hashlib's OpenSSL into every ``unbake`` run); raises OSError."""
    from engine.weights import sha256_of
    return sha256_of(path)


def remove_partials(job: Job) -> list[Path]:
    """Delete the temporaries a killed bounce left beside ``job``'s destinations: stems'
    ``.NAME.XXXXXXXX.partial.EXT`` and the sidecar's ``.NAME.XXXXXXXX.partial``. Returns them."""
    patterns: dict[Path, list[re.Pattern]] = {}
    for dest in job.outputs.values():
        patterns.setdefault(dest.parent, []).append(
            re.compile(rf"\.{re.escape(dest.stem)}\.{_TEMP_RAND}\.partial{re.escape(dest.suffix)}"))
    if job.sidecar is not None:
        patterns.setdefault(job.sidecar.parent, []).append(
            re.compile(rf"\.{re.escape(job.sidecar.name)}\.{_TEMP_RAND}\.partial"))
    removed = []
    for folder, pats in patterns.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and any(p.fullmatch(name) for p in pats):
                try:
                    (folder / name).unlink()
                    removed.append(folder / name)
                except FileNotFoundError:
                    pass
    return removed


def describe_output(path: Path, frames: int, clipped_samples: int = 0, peak: float = 0.0) -> dict:
    """The sidecar's record of one written file: path, frames, size, mtime_ns, sha256, clipping."""
    st = path.stat()
    return {"path": str(path), "frames": int(frames), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(path), "clipped_samples": int(clipped_samples), "peak": round(float(peak), 6)}


def write_sidecar(path: Path, data: dict) -> None:
    """JSON to ``path`` atomically: a temp file beside it, flushed and fsynced, then os.replace.
    Raises OutputError."""
    from engine.errors import OutputError
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def _intact(rec: Any, dest: Path, verify: bool) -> bool:
    if not isinstance(rec, dict) or rec.get("path") != str(dest):
        return False
    try:
        st = dest.stat()
    except OSError:
        return False
    if st.st_size != rec.get("size"):
        return False
    if not verify and st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    try:
        return sha256_file(dest) == rec.get("sha256")
    except OSError:
        return False


def is_done(job: Job, input_sha256: str, identity: dict, *, verify: bool = False) -> bool:
    """Whether ``job``'s sidecar says its outputs are done and still match: same schema version,
    input sha256, ``identity`` (``{"model": {name, weights_sha256}, "chain": {name, sha256, path} or
    None, "options": {...}}``, compared as JSON values; the chain by name and sha256 only), the
    same output paths, each output intact (present, recorded size, recorded
    mtime_ns or else recorded sha256; ``verify``: always the sha256). Never raises."""
    if job.sidecar is None:
        return False
    try:
        with open(job.sidecar, encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        return False
    try:
        if side.get("schema") != SCHEMA_ID or side["input"]["sha256"] != input_sha256:
            return False
        want = _plain(identity)
        if side["model"] != want["model"] or side["options"] != want["options"]:
            return False
        chain, want_chain = side["chain"], want.get("chain")
        if (chain is None) != (want_chain is None) or (
                chain is not None and (chain["name"], chain["sha256"]) != (want_chain["name"], want_chain["sha256"])):
            return False  # the preset's path may change; its name and bytes may not
        stems = side["stems"]
        if set(stems) != set(job.dests):
            return False
        if (side.get("remix") is None) != (job.remix is None):
            return False
        return (all(_intact(stems[s], d, verify) for s, d in job.dests.items())
                and (job.remix is None or _intact(side["remix"], job.remix, verify)))
    except (KeyError, TypeError, AttributeError):
        return False


def _plain(value: Any) -> Any:
    """A value as it reads back from JSON (tuples become lists, ints stay ints)."""
    return json.loads(json.dumps(value))


# -- bouncing -----------------------------------------------------------------------------------

@dataclass
class Settings:
    """What ``run`` does. out_dir (Path, default ./separated); model (str | None: the chain
    preset's model, else the daemon's default); template (``--filename``); fmt
    (``OutputFormat``; None: 16-bit WAV); options ({segment_s, overlap, shifts, two_stems}: session
    options, None for the model's default); chain (a preset name or path, or None); jobs (inputs in
    flight at once, >= 1); verify (hash every output when checking a resume); endpoint (None:
    $UNBAKE_ENDPOINT, else the per-user socket, autostarted); daemon_args (for an autostarted
    engine); timeout_s (the client's reply timeout); repo (a weights folder for every session of
    the run, however the engine was started: ``Client(repo=...)``; None: the engine's own);
    engine_flags ({device, fp16}: the engine settings asked for, checked against the running
    engine by ``plugin_bridge.flags.engine_flag_warnings``)."""
    out_dir: Path = Path("separated")
    model: str | None = None
    template: str = DEFAULT_TEMPLATE
    fmt: Any = None
    options: dict = field(default_factory=dict)
    chain: str | None = None
    jobs: int = 1
    verify: bool = False
    endpoint: str | None = None
    daemon_args: list = field(default_factory=list)
    timeout_s: float = 10.0
    repo: str | None = None
    engine_flags: dict = field(default_factory=dict)

    def output_format(self):
        from engine.stemfiles import OutputFormat
        return self.fmt if self.fmt is not None else OutputFormat()

    def session_options(self) -> dict:
        """The session options sent to the engine: None values left out."""
        return {k: v for k, v in self.options.items() if v is not None}

    def recorded_options(self) -> dict:
        """The sidecar's ``options``: every session option (null: the model's default) and the output
        format (bit_depth for wav/flac, mp3_bitrate_kbps for mp3, the other null)."""
        fmt = self.output_format()
        o = self.options
        return {"segment_s": o.get("segment_s"), "overlap": o.get("overlap"), "shifts": int(o.get("shifts") or 0),
                "two_stems": o.get("two_stems"),
                "format": {"ext": fmt.ext, "bit_depth": None if fmt.ext == "mp3" else fmt.bit_depth,
                           "mp3_bitrate_kbps": fmt.mp3_bitrate_kbps if fmt.ext == "mp3" else None}}


@dataclass
class Result:
    """One row of the summary: input (str, as shown), status ("ok" | "skipped" | "failed"),
    seconds (float), error (one line, or None), code (the error's ``engine.errors`` code, or
    None), sidecar (Path or None)."""
    input: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    code: str | None = None
    sidecar: Path | None = None


@dataclass
class Context:
    """What every input of a run shares: identity ({model, chain, options} for the sidecar and the
    resume check), stems (list[str], the model's), engine_version, device (the daemon's), preset
    (a ``plugin_bridge.chains.ChainPreset`` or None), hello (the daemon's hello reply)."""
    identity: dict
    stems: list[str]
    engine_version: str
    device: str
    preset: Any = None
    hello: dict = field(default_factory=dict)

    @property
    def model_dir(self) -> str:
        """The folder under OUT: ``MODEL``, or ``MODEL+CHAIN`` with a chain."""
        return self.identity["model"]["name"] + (f"+{self.preset.name}" if self.preset is not None else "")


def _one_line(e: BaseException, path: Path | None = None) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if path is not None:
        for prefix in (f"{path}: ", f"{path.name}: "):
            if text.startswith(prefix):
                return text[len(prefix):]
    return text


def _bounce_chain(job: Job, client, settings: Settings, ctx: Context):
    """Whole file through the preset's StemChain (offline, aligned), as `unbake separate --chain`
    (``plugin_bridge.chains.chain_file``): the processed stems and their sum (the remix), written
    atomically. Returns {name: (path, StemReport, frames)} and (sample_rate, channels, frames)."""
    from plugin_bridge.chains import chain_file
    model = ctx.identity["model"]["name"]
    report = chain_file(client, ctx.preset, job.input.path, model, list(ctx.stems), job.outputs,
                        settings.output_format(), None, settings.session_options())
    return ({n: (r.path, r, report.frames) for n, r in report.stems.items()},
            (report.sample_rate, report.channels, report.frames))


def _bounce_stems(job: Job, client, settings: Settings, ctx: Context):
    """Streamed through a daemon session into the stem files (``separate_file_via``)."""
    from plugin_bridge.files import separate_file_via
    model = ctx.identity["model"]["name"]
    report, used = separate_file_via(client, job.input.path, job.dests, settings.output_format(), model=model,
                                     **settings.session_options())
    if used != model:
        raise ProtocolError(f"{job.input.path}: the engine used model {used!r}, not {model!r}")
    return ({s: (r.path, r, report.frames) for s, r in report.stems.items()},
            (report.sample_rate, report.channels, report.frames))


def bounce_one(job: Job, client, settings: Settings, ctx: Context) -> Result:
    """Bounce one planned input through ``client`` (a ``plugin_bridge.client.Client`` this thread
    owns): delete stale temporaries of its destinations, hash the input, skip it if ``is_done``,
    else delete its old sidecar, write the stems (and remix), then the sidecar, last.

    Returns a Result: "skipped", "ok", or "failed" with the one-line error; raises only
    EngineUnavailable (so the caller can reconnect: the input has failed) and KeyboardInterrupt.
    """
    t0 = time.perf_counter()
    path = job.input.path

    def failed(e: BaseException) -> Result:
        return Result(job.input.source, "failed", time.perf_counter() - t0, _one_line(e, path),
                      getattr(e, "code", type(e).__name__))

    if job.error is not None:
        return Result(job.input.source, "failed", 0.0, job.error, "E_BAD_REQUEST" if path else "E_BAD_AUDIO")
    try:
        remove_partials(job)
        from engine.inputs import input_stat
        st0 = input_stat(path)  # BadAudio: gone, a folder, a named pipe (hashing one would block)
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise BadAudio(f"{path}: no such file") from None
        except OSError as e:
            raise BadAudio(f"{path}: cannot read ({e.strerror or e})") from None
        if is_done(job, digest, ctx.identity, verify=settings.verify):
            return Result(job.input.source, "skipped", time.perf_counter() - t0, sidecar=job.sidecar)
        job.sidecar.unlink(missing_ok=True)  # from now on the old outputs are not vouched for
        written, (sr, channels, frames) = (_bounce_chain if ctx.preset is not None else _bounce_stems)(
            job, client, settings, ctx)
        st1 = path.stat()
        if (st1.st_size, st1.st_mtime_ns) != (st0.st_size, st0.st_mtime_ns):
            raise BadAudio(f"{path}: changed while it was bounced; run again")
        outputs = {n: describe_output(p, fr, r.clipped_samples, r.peak) for n, (p, r, fr) in written.items()}
        side = {
            "schema": SCHEMA_ID,
            "input": {"path": str(path), "size": st0.st_size, "mtime_ns": st0.st_mtime_ns, "sha256": digest},
            "sample_rate": int(sr), "channels": int(channels), "frames": int(frames),
            **_plain(ctx.identity),
            "stems": {s: outputs[s] for s in job.dests},
            "remix": outputs.get(REMIX_STEM),
            "latency_samples": 0,
            "engine_version": ctx.engine_version,
            "device": ctx.device,
            "seconds": round(time.perf_counter() - t0, 3),
            "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        write_sidecar(job.sidecar, side)
        return Result(job.input.source, "ok", time.perf_counter() - t0, sidecar=job.sidecar)
    except EngineUnavailable as e:
        e.result = failed(e)
        raise
    except (UnbakeError, OSError) as e:
        return failed(e)
    except Exception as e:  # a bug must not stop the other inputs either; say what it was
        r = failed(e)
        r.error = f"{type(e).__name__}: {r.error}"
        return r


def _connect(settings: Settings):
    from engine.protocol import default_endpoint
    from plugin_bridge.client import Client
    endpoint = settings.endpoint or default_endpoint()
    return Client(endpoint, autostart=True, timeout_s=settings.timeout_s, daemon_args=settings.daemon_args,
                  repo=settings.repo)


def prepare(client, settings: Settings) -> Context:
    """Ask the daemon what a run will use: engine version and device (hello), the model's resolved
    name, stems and weights sha256 (one session opened and cancelled, which also loads the model and
    checks the options), the chain preset (loaded and checked against the stems). Raises the
    client's errors, BadRequest, ``plugin_bridge.chains.ChainError``."""
    import engine
    preset = None
    model = settings.model
    if settings.chain:
        from plugin_bridge.chains import load_chain
        preset = load_chain(settings.chain)
        model = model or preset.model
    hello = client.hello()
    session = client.open(model, 44100, 2, **settings.session_options())
    try:
        name, stems, weights = session.model, list(session.stems), getattr(session, "weights_sha256", None)
    finally:
        try:
            session.cancel()
        except UnbakeError:
            pass
    if preset is not None:
        preset.check_stems(stems, name)
    chain = None if preset is None else {"name": preset.name, "path": str(Path(preset.path).resolve()),
                                         "sha256": preset.sha256 or sha256_file(Path(preset.path))}
    identity = {"model": {"name": name, "weights_sha256": weights}, "chain": chain,
                "options": settings.recorded_options()}
    return Context(identity, stems, str(hello.get("engine_version") or engine.__version__),
                   str(hello.get("device") or "?"), preset, hello)


def check_run(args: Iterable[str], settings: Settings, lists: Iterable[str] = ()) -> tuple[list, list]:
    """The checks every run makes before it connects to anything: the output format (BadRequest
    once, not once per input) and that some input is named. Returns (args, lists) as lists."""
    settings.output_format()
    args, lists = list(args), list(lists)
    if not args and not lists:
        raise BadRequest("no inputs: name files, folders, globs or list files (--list FILE)")
    return args, lists


def plan_run(args: list[str], lists: list[str], settings: Settings, model_dir: str, stems: list[str],
             remix: bool) -> list[Job]:
    """``expand_inputs`` (the output folder and ``OUT/model_dir`` excluded) then ``plan``: the Jobs of
    a run, in input order. model_dir: ``Context.model_dir``; remix: whether a chain writes one.
    Raises BadRequest (a template wrong for every input)."""
    out_dir = Path(settings.out_dir).resolve()
    inputs = expand_inputs(args, lists=lists, exclude=[out_dir, out_dir / model_dir])
    return plan(inputs, out_dir, model_dir, stems, settings.output_format(), template=settings.template,
                remix=remix)


def progress_line(k: int, n: int, result: Result) -> str:
    """The line ``log`` hears when the k-th of n inputs ends: ``[k/n] input: status (s)[: error]``."""
    return (f"[{k}/{n}] {result.input}: {result.status} ({result.seconds:.1f} s)"
            + (f": {result.error}" if result.error else ""))


def run(args: Iterable[str], settings: Settings, *, lists: Iterable[str] = (),
        log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> list[Result]:
    """Bounce every input ``args`` and ``lists`` name (``expand_inputs``), ``settings.jobs`` at a
    time; returns one Result per input, in input order. log(line) hears of each input as it ends;
    warn(line) of each of ``settings.engine_flags`` the running engine does not honour.

    Raises (before any input is bounced) BadRequest for no inputs or a bad template / output format,
    and the errors of ``prepare`` (no engine, unknown model, bad chain preset).
    """
    args, lists = check_run(args, settings, lists)
    first = _connect(settings)
    clients = [first]
    lock = threading.Lock()
    local = threading.local()
    try:
        ctx = prepare(first, settings)
        if warn is not None and settings.engine_flags:
            from .flags import engine_flag_warnings
            for line in engine_flag_warnings(ctx.hello, first.endpoint, **settings.engine_flags):
                warn(line)
        jobs = plan_run(args, lists, settings, ctx.model_dir, ctx.stems, ctx.preset is not None)
        done = [0]

        spare = [first] if settings.jobs <= 1 else []  # one job: the probe's connection is reused

        def work(job: Job) -> Result:
            client = getattr(local, "client", None)
            if client is None:
                client = spare.pop() if spare else _connect(settings)
                local.client = client
                with lock:
                    if client is not first:
                        clients.append(client)
            try:
                result = bounce_one(job, client, settings, ctx)
            except EngineUnavailable as e:  # the engine went away or hangs: reconnect for the next input
                result = e.result
                client.close()
                local.client = None
            if log is not None:
                with lock:
                    done[0] += 1
                    log(progress_line(done[0], len(jobs), result))
            return result

        if settings.jobs <= 1:
            return [work(j) for j in jobs]
        pool = ThreadPoolExecutor(max_workers=int(settings.jobs), thread_name_prefix="bounce")
        try:
            futures = [pool.submit(work, j) for j in jobs]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for c in clients:
            c.close()


def format_summary(results: list[Result], seconds: float | None = None) -> str:
    """The table printed at the end: input, status, seconds, error; then the counts."""
    width = max([len("input"), *(len(r.input) for r in results)])  # never cut: scripts read it
    lines = [f"{'input':<{width}}  {'status':<7}  {'seconds':>7}  error"]
    for r in results:
        lines.append(f"{r.input:<{width}}  {r.status:<7}  {r.seconds:>7.2f}  {r.error or ''}".rstrip())
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    lines.append(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
                 + (f" in {seconds:.1f} s" if seconds is not None else ""))
    return "\n".join(lines)

