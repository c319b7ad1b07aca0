"""Set up a line PC to serve one line under systemd (DESIGN sections 3 and 9).

:func:`install` writes everything under a destination root: ``/`` on the line PC itself, or a
staging directory (an image being built, a test). Under that root it writes:

- ``<prefix>/venv``: the worker's virtual environment, created with pip from the source tree, a
  link to an existing environment, or left alone;
- ``/etc/systemd/system/inspector@.service``: the repository's unit with the prefix in
  ``ExecStart``; with a Redis password file also ``/etc/inspector/credentials/redis_password``
  (mode 0600) and the per-line drop-in ``inspector@<line>.service.d/credentials.conf`` that hands
  it to the worker with ``LoadCredential=``;
- ``/etc/inspector/line<line>.toml``: a commented config, loaded with
  :func:`inspector.config.load_config` before it is put in place, and
  ``/etc/inspector/line<line>.env`` from the example; both are kept when they exist;
- ``/usr/lib/sysusers.d/inspector.conf`` and ``/usr/lib/tmpfiles.d/inspector.conf``: the
  ``inspector`` account, its GPU groups and ``/var/lib/inspector``.

It creates no account and never runs ``systemctl``: the returned report lists the commands that
apply what it wrote. Every input is checked before the first file is written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from inspector.config import (
    CREDENTIAL_REDIS_PASSWORD,
    DEFAULT_CONFIG_TEMPLATE,
    STAGES,
    BankConfig,
    ConfigError,
    WorkerConfig,
    load_config,
    mask_url_secrets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
UNIT_TEMPLATE = Path("systemd") / "inspector@.service"
ENV_EXAMPLE = Path("systemd") / "inspector.env.example"

DEFAULT_PREFIX = "/opt/inspector"
TEMPLATE_PREFIX = "/opt/inspector"  # the prefix the repository's unit names in ExecStart
SERVICE_USER = "inspector"
UNIT_FILE = PurePosixPath("/etc/systemd/system/inspector@.service")
CONFIG_DIR = PurePosixPath("/etc/inspector")
CREDENTIAL_FILE = CONFIG_DIR / "credentials" / CREDENTIAL_REDIS_PASSWORD
STATE_DIR = PurePosixPath("/var/lib/inspector")
SYSUSERS_FILE = PurePosixPath("/usr/lib/sysusers.d/inspector.conf")
TMPFILES_FILE = PurePosixPath("/usr/lib/tmpfiles.d/inspector.conf")
DROP_IN_NAME = "credentials.conf"
VENV_NAME = "venv"
VENV_EXECUTABLE = Path("bin") / "inspector"
VENV_MARKER = "pyvenv.cfg"
BACKUP_SUFFIX = ".bak"
EXAMPLE_LINE_PLACEHOLDER = "<N>"
VENV_CREATE, VENV_SKIP = "create", "skip"

MODE_PUBLIC = 0o644  # unit, config, environment, declarations: nothing secret in them
MODE_SECRET = 0o600  # the Redis password: root only; systemd reads it for LoadCredential=
MODE_SECRET_DIR = 0o700
STATE_DIR_MODE = "0750"  # tmpfiles.d syntax: the worker and its group read banks, others nothing

MAX_LINE_NAME_LENGTH = 64  # the line names a unit instance, Redis keys and ZMQ topics: keep it short
LINE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_LINE_NAME_LENGTH}}}")
PREFIX_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+")  # written unquoted and unescaped into ExecStart
SECRET_FIELDS = {("banks", "password")}
BMP_MAX = 0xFFFF  # the largest code point a 4-digit TOML escape can name  # never written into the config file

Progress = Callable[[str], Any]
RunCommand = Callable[[Sequence[str]], Any]


class InstallError(ValueError):
    """The installation cannot go ahead; the message says what to change."""


@dataclass(frozen=True)
class InstallReport:
    """What :func:`install` did, and what is left to do on the machine.

    Attributes:
        root: the destination root.
        line: the line installed.
        written: files, directories and links written (paths under ``root``).
        kept: existing files left as they were (paths under ``root``).
        notices: what the operator should know or do by hand.
        next_commands: commands to run as root on the line PC to start the service.
    """

    root: Path
    line: str
    written: tuple[Path, ...]
    kept: tuple[Path, ...]
    notices: tuple[str, ...]
    next_commands: tuple[str, ...]

    def format(self) -> str:
        """A human summary: files, notices, then the commands to run."""
        out = [f"installed line {self.line} under {self.root}"]
        out += [f"  wrote {path}" for path in self.written]
        out += [f"  kept  {path}" for path in self.kept]
        if self.notices:
            out.append("notes:")
            out += [f"  - {notice}" for notice in self.notices]
        out.append("next, as root on the line PC:")
        out += [f"  {command}" for command in self.next_commands]
        return "\n".join(out)


@dataclass(frozen=True)
class _Templates:
    unit: str
    env: str


class _Steps:
    """Collects what was written and kept, telling ``progress`` as it goes."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.written: list[Path] = []
        self.kept: list[Path] = []
        self.notices: list[str] = []

    def wrote(self, path: Path) -> None:
        self.written.append(path)
        self.progress(f"wrote {path}")

    def keep(self, path: Path, why: str | None = None) -> None:
        self.kept.append(path)
        self.progress(f"kept {path}")
        if why:
            self.notice(why)

    def notice(self, text: str) -> None:
        self.notices.append(text)
        self.progress(f"note: {text}")


def install(
    root: Path,
    line: str,
    prefix: str = DEFAULT_PREFIX,
    artifact: str | None = None,
    store: str | None = None,
    source: Path = REPO_ROOT,
    venv: str | Path = VENV_CREATE,
    redis_password_file: Path | None = None,
    force: bool = False,
    progress: Progress = print,
    *,
    run_command: RunCommand | None = None,
) -> InstallReport:
    """Install the worker for one line under ``root``.

    Args:
        root: destination root, absolute and existing (``/`` on the line PC).
        line: line name, ``[A-Za-z0-9_-]{1,64}``; the unit instance is ``inspector@<line>``.
        prefix: absolute install prefix on the machine; ``<prefix>/venv/bin/inspector`` is run.
        artifact: model artifact directory written as ``[engine] artifact`` (absolute).
        store: bank store URL written as ``[banks] store`` (default: the file store). It must
            not hold a password; pass ``redis_password_file`` for that.
        source: source tree holding ``systemd/`` and, for ``venv="create"``, ``pyproject.toml``.
        venv: ``"create"`` (``python -m venv`` and a non-editable ``pip install`` of ``source``),
            ``"skip"``, or the path of an existing environment with ``inspector`` installed,
            which ``<prefix>/venv`` then links to.
        redis_password_file: file holding the Redis password, installed as a systemd credential.
        force: replace an existing line config (the old one is kept with a ``.bak`` suffix).
        progress: called with one line of text per step.
        run_command: runs one command and raises on failure (default: :func:`subprocess.run`).

    Returns:
        What was written and kept, notices, and the commands that start the service.

    Raises:
        InstallError: bad input, or a config that would not load; raised before anything is
            written, except when creating the environment fails.
    """
    root = _check_root(root)
    _check_line(line)
    prefix_path = _check_prefix(prefix)
    _check_artifact(artifact)
    _check_store(store, line)
    templates = _read_templates(Path(source))
    venv_choice = _check_venv(venv, Path(source), _under(root, prefix_path / VENV_NAME))
    secret_file = _check_password_file(redis_password_file)
    steps = _Steps(progress)
    artifact_set = _install_config(root, line, artifact, store, force, steps)
    _install_env(root, line, templates.env, steps)
    if secret_file is not None:
        _install_credential(root, line, secret_file, steps)
    _install_unit(root, prefix_path, templates.unit, steps)
    _install_accounts(root, steps)
    _install_venv(root, prefix_path, venv_choice, Path(source), run_command or _run, steps)
    if not artifact_set:
        steps.notice(f"set [engine] artifact in {config_path(line)} before enabling the service")
    return InstallReport(root, line, tuple(steps.written), tuple(steps.kept), tuple(steps.notices),
                         next_commands(line))


def config_path(line: str) -> PurePosixPath:
    """The line's config file on the machine (what the unit passes to ``--config``)."""
    return PurePosixPath(DEFAULT_CONFIG_TEMPLATE.format(line=line))


def env_path(line: str) -> PurePosixPath:
    """The line's environment file on the machine (the unit's ``EnvironmentFile=``)."""
    return CONFIG_DIR / f"line{line}.env"


def drop_in_path(line: str) -> PurePosixPath:
    """The per-line drop-in that loads the Redis password credential."""
    return UNIT_FILE.parent / f"inspector@{line}.service.d" / DROP_IN_NAME


def next_commands(line: str) -> tuple[str, ...]:
    """What applies an installation on the machine: account, state directory, unit."""
    return (
        f"systemd-sysusers {SYSUSERS_FILE}",
        f"systemd-tmpfiles --create {TMPFILES_FILE}",
        "systemctl daemon-reload",
        f"systemctl enable --now inspector@{line}",
    )


# --------------------------------------------------------------------------- checks (no writes)


def _under(root: Path, path: PurePosixPath) -> Path:
    """``path`` (absolute on the machine) inside ``root``; a leading ``/`` cannot escape it."""
    if not path.is_absolute() or ".." in path.parts:
        raise InstallError(f"{path}: expected an absolute path without '..'")
    return root.joinpath(*path.parts[1:])


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_absolute():
        raise InstallError(f"--root {root}: must be an absolute path (/ for this machine)")
    if not root.is_dir():
        raise InstallError(f"--root {root}: not an existing directory")
    return root


def _check_line(line: str) -> None:
    if not isinstance(line, str) or not LINE_NAME.fullmatch(line):
        raise InstallError(
            f"--line {line!r}: use 1 to {MAX_LINE_NAME_LENGTH} letters, digits, '_' or '-' (it names the unit instance)"
        )


def _check_prefix(prefix: str) -> PurePosixPath:
    text = str(prefix).rstrip("/")
    path = PurePosixPath(text)
    if not PREFIX_PATH.fullmatch(text) or any(part in (".", "..") for part in path.parts):
        raise InstallError(
            f"--prefix {prefix!r}: expected an absolute path of letters, digits and ._+- "
            "without '.' or '..' components, e.g. /opt/inspector"
        )
    return path


def _check_artifact(artifact: str | None) -> None:
    if artifact is None:
        return
    path = PurePosixPath(artifact)
    if not artifact.isprintable() or not path.is_absolute() or ".." in path.parts:
        raise InstallError(
            f"--artifact {artifact!r}: expected an absolute path without '..' (the service does not run in this directory)"
        )


def _check_store(store: str | None, line: str) -> None:
    """The store URL, checked by the worker's own rules, and free of credentials."""
    if store is None:
        return
    if not store.isprintable():
        raise InstallError(f"--store {store!r}: must be printable text")
    if urlsplit(store).password is not None or mask_url_secrets(store) != store:
        raise InstallError(
            "--store: the URL holds a password; give the URL without it and pass "
            "--redis-password-file FILE, which becomes a systemd credential"
        )
    try:
        load_config(None, {}, {"banks.store": store}, line)
    except ConfigError as err:
        raise InstallError(f"--store: {err}") from None


def _read_templates(source: Path) -> _Templates:
    texts = []
    for relative in (UNIT_TEMPLATE, ENV_EXAMPLE):
        path = source / relative
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise InstallError(f"{path}: cannot be read ({err.strerror}); --source must be the Inspector source tree") from None
    return _Templates(*texts)


def _check_venv(venv: str | Path, source: Path, venv_dir: Path) -> str | Path:
    """``"create"``, ``"skip"`` or the resolved path of an environment to link to."""
    if venv in (VENV_CREATE, VENV_SKIP):
        if venv == VENV_CREATE and not (source / "pyproject.toml").is_file():
            raise InstallError(f"--venv create: {source} has no pyproject.toml to install")
        return str(venv)
    target = Path(venv).resolve()
    executable = target / VENV_EXECUTABLE
    if not (target / VENV_MARKER).is_file() or not os.access(executable, os.X_OK):
        raise InstallError(f"--venv {venv}: not a virtual environment with {VENV_EXECUTABLE} in it")
    if venv_dir.exists() and not venv_dir.is_symlink() and venv_dir.resolve() != target:
        raise InstallError(
            f"{venv_dir} is an environment, not a link: remove it to link {target} instead, "
            "or pass --venv create to install into it"
        )
    return target


def _check_password_file(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InstallError(f"--redis-password-file {path}: not a file")
    if path.stat().st_size == 0:
        raise InstallError(f"--redis-password-file {path}: is empty")
    return path


def _load(path: Path, line: str | None) -> WorkerConfig:
    """Load a config file as the worker would, with no environment (``line=None``: its own)."""
    try:
        return load_config(path, {}, {}, line)
    except ConfigError as err:
        raise InstallError(str(err)) from None


# --------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, with ``mode`` from the start (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def _install_config(root: Path, line: str, artifact: str | None, store: str | None, force: bool,
                    steps: _Steps) -> bool:
    """Write (or keep) the line's config; return whether it sets an artifact."""
    target = _under(root, config_path(line))
    if target.exists() and not force:
        cfg = _load(target, line)
        steps.keep(target, f"kept the existing {config_path(line)} (--force replaces it and keeps a {BACKUP_SUFFIX})")
        if artifact is not None or store is not None:
            steps.notice("--artifact and --store were not applied to the kept config")
        return bool(cfg.engine.artifact)
    staged = target.with_name(f".{target.name}.new")
    _write(staged, render_config(line, artifact, store).encode(), MODE_PUBLIC)
    try:
        cfg = _load(staged, None)
        if (cfg.line, cfg.engine.artifact, cfg.banks.store) != (line, artifact or "", store or BankConfig.store):
            raise InstallError("the rendered config does not say what was asked")
    except InstallError as err:
        staged.unlink()
        raise InstallError(f"the config for {config_path(line)} does not load: {err}") from None
    if target.exists():
        backup = target.with_name(target.name + BACKUP_SUFFIX)
        _write(backup, target.read_bytes(), MODE_PUBLIC)
        steps.wrote(backup)
    os.replace(staged, target)
    steps.wrote(target)
    if artifact is not None and not _under(root, PurePosixPath(artifact)).exists():
        steps.notice(f"the artifact {artifact} is not there yet: copy it before starting the service")
    return artifact is not None


def _install_env(root: Path, line: str, example: str, steps: _Steps) -> None:
    target = _under(root, env_path(line))
    if target.exists():
        steps.keep(target)
        return
    _write(target, example.replace(EXAMPLE_LINE_PLACEHOLDER, line).encode(), MODE_PUBLIC)
    steps.wrote(target)


def _install_credential(root: Path, line: str, secret_file: Path, steps: _Steps) -> None:
    target = _under(root, CREDENTIAL_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.parent.chmod(MODE_SECRET_DIR)
    _write(target, secret_file.read_bytes(), MODE_SECRET)
    steps.wrote(target)
    drop_in = _under(root, drop_in_path(line))
    _write(drop_in, render_credentials_drop_in().encode(), MODE_PUBLIC)
    steps.wrote(drop_in)


def _install_unit(root: Path, prefix: PurePosixPath, template: str, steps: _Steps) -> None:
    target = _under(root, UNIT_FILE)
    _write(target, render_unit(template, prefix).encode(), MODE_PUBLIC)
    steps.wrote(target)


def _install_accounts(root: Path, steps: _Steps) -> None:
    for path, text in ((SYSUSERS_FILE, render_sysusers()), (TMPFILES_FILE, render_tmpfiles())):
        target = _under(root, path)
        _write(target, text.encode(), MODE_PUBLIC)
        steps.wrote(target)


def _install_venv(root: Path, prefix: PurePosixPath, choice: str | Path, source: Path,
                  run_command: RunCommand, steps: _Steps) -> None:
    venv_dir = _under(root, prefix / VENV_NAME)
    if choice == VENV_SKIP:
        steps.notice(f"--venv skip: {prefix / VENV_NAME / VENV_EXECUTABLE} must exist before the service starts")
    elif isinstance(choice, Path):
        _link_venv(venv_dir, choice, steps)
    else:
        _create_venv(root, venv_dir, source, run_command, steps)


def _link_venv(venv_dir: Path, target: Path, steps: _Steps) -> None:
    if venv_dir.exists() and not venv_dir.is_symlink():
        steps.keep(venv_dir)  # it is the environment asked for (checked before writing)
        return
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = venv_dir.with_name(f".{venv_dir.name}.link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target, target_is_directory=True)
    os.replace(staged, venv_dir)  # a link already there is swapped in one step
    steps.wrote(venv_dir)


def _create_venv(root: Path, venv_dir: Path, source: Path, run_command: RunCommand, steps: _Steps) -> None:
    if venv_dir.is_symlink():
        venv_dir.unlink()  # a link to another environment is replaced, never installed into
    steps.progress(f"creating the virtual environment {venv_dir}")
    _call(run_command, [sys.executable, "-m", "venv", str(venv_dir)])
    steps.progress(f"installing {source} into it with pip (minutes: the torch wheels are large)")
    _call(run_command, [str(venv_dir / "bin" / "python"), "-m", "pip", "install", str(source)])
    steps.wrote(venv_dir)
    if root != Path("/"):
        steps.notice(
            f"{venv_dir} names its own path in its scripts: it runs only where it sits now; "
            "on another machine create the environment there (install --root / --venv create)"
        )


def _run(command: Sequence[str]) -> None:
    subprocess.run(command, check=True)


def _call(run_command: RunCommand, command: Sequence[str]) -> None:
    try:
        run_command(command)
    except (subprocess.CalledProcessError, OSError) as err:
        raise InstallError(f"{' '.join(command)} failed: {err}") from None


# --------------------------------------------------------------------------- rendering


def render_unit(template: str, prefix: PurePosixPath) -> str:
    """The unit template with ``prefix`` in place of the template's in ``ExecStart``.

    Raises:
        InstallError: the template has no single ``ExecStart=`` running the prefix's worker.
    """
    lines = template.splitlines(keepends=True)
    starts = [index for index, text in enumerate(lines) if text.startswith("ExecStart=")]
    expected = f"ExecStart={TEMPLATE_PREFIX}/{VENV_NAME}/{VENV_EXECUTABLE} "
    if len(starts) != 1 or not lines[starts[0]].startswith(expected):
        raise InstallError(f"the unit template needs exactly one line starting {expected!r}")
    index = starts[0]
    lines[index] = f"ExecStart={prefix}/" + lines[index][len(f"ExecStart={TEMPLATE_PREFIX}/"):]
    return "".join(lines)


def render_credentials_drop_in() -> str:
    """The per-line drop-in that hands the Redis password to the worker as a credential."""
    return (
        "# The Redis password for banks.password, read by the worker from\n"
        f"# $CREDENTIALS_DIRECTORY/{CREDENTIAL_REDIS_PASSWORD}. Written by `inspector install`.\n"
        "[Service]\n"
        f"LoadCredential={CREDENTIAL_REDIS_PASSWORD}:{CREDENTIAL_FILE}\n"
    )


def render_sysusers() -> str:
    """sysusers.d: the worker's system account, its home and its GPU groups."""
    return (
        f"# The Inspector worker's account (inspector@.service). Its home, {STATE_DIR}, holds the\n"
        "# file bank store and the CUDA, Triton and TensorRT caches; it has no login shell.\n"
        f'u {SERVICE_USER} - "Inspector worker" {STATE_DIR}\n'
        "# The GPU device nodes (/dev/nvidia*, /dev/dri/*) are open to these groups.\n"
        f"m {SERVICE_USER} video\n"
        f"m {SERVICE_USER} render\n"
    )


def render_tmpfiles() -> str:
    """tmpfiles.d: the worker's state directory."""
    return (
        "# Inspector state: the file bank store and the worker's caches (inspector@.service).\n"
        f"d {STATE_DIR} {STATE_DIR_MODE} {SERVICE_USER} {SERVICE_USER} -\n"
    )


def render_config(line: str, artifact: str | None, store: str | None) -> str:
    """A commented TOML config for one line: line, artifact and store set, other defaults shown.

    The commented values are taken from the config dataclasses, so they stay the defaults.
    """
    out = [
        f"# Inspector worker, line {line}: read by `inspector run --line {line}` (inspector@{line}.service).",
        f"# Settings in {env_path(line)} (INSPECTOR_<STAGE>_<FIELD>) override this file; flags override both.",
        "# Commented keys show their defaults. Check the result with:",
        f"#     inspector run --line {line} --config {config_path(line)} --print-config",
        "# No secrets here: the Redis password is a systemd credential (install --redis-password-file).",
        "",
        f"line = {_toml(line)}",
    ]
    chosen = {("engine", "artifact"): artifact or "", ("banks", "store"): store or BankConfig.store}
    for stage, cls in STAGES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")
        out += ["", f"[{stage}]", f"# {summary}"]
        if stage == "engine" and artifact is None:
            out.append("# Required: the model artifact directory (inspector train --out DIR).")
        for spec in dataclasses.fields(cls):
            out.append(_render_field(stage, spec, chosen))
    return "\n".join(out) + "\n"


def _render_field(stage: str, spec: dataclasses.Field, chosen: dict[tuple[str, str], str]) -> str:
    key = (stage, spec.name)
    if key in chosen:
        return f"{spec.name} = {_toml(chosen[key])}"
    if key in SECRET_FIELDS:
        return f"# {spec.name}: not in this file; a systemd credential (see inspector@.service)"
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
    if default is None:
        return f"# {spec.name}: unset by default"
    return f"# {spec.name} = {_toml(default)}"


def _toml(value: Any) -> str:
    """A TOML literal for a config value (string, bool, number, tuple of numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return '"' + "".join(_toml_char(char) for char in str(value)) + '"'


def _toml_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    # Control characters may not appear raw in a TOML string; \u takes 4 hex digits, \U 8.
    return f"\\u{ord(char):04x}" if ord(char) <= BMP_MAX else f"\\U{ord(char):08x}"
