"""Line-PC installation: the files it writes, the unit systemd accepts, the worker that unit starts.

Everything is installed into ``tmp_path``. No test creates a virtual environment: ``<prefix>/venv``
links to the environment running the tests, so the installed unit's ``ExecStart`` runs the real
``inspector`` console script. The systemd checks use Debian's ``systemd`` tools offline
(``systemd-analyze verify``, ``systemd-sysusers --root``, ``systemd-tmpfiles --root``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from deploy import install as inst
from deploy.cli import EXIT_BAD_INPUT, EXIT_OK, add_install_parser, cmd_install
from inspector.config import BankConfig, WorkerConfig, default_config_path, load_config

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "systemd" / "inspector@.service"
ENV_EXAMPLE = REPO / "systemd" / "inspector.env.example"
LINE = "3"
ARTIFACT = "/opt/inspector/models/valve-2025"
STORE = "redis://127.0.0.1:6379/0"
SECRET = "correct-horse-battery-staple"
SUBPROCESS_TIMEOUT_S = 60  # --print-config takes well under a second; this only bounds a hang
# Fields of /etc/passwd and /etc/group rows (passwd(5), group(5)).
PASSWD_UID, PASSWD_HOME = 2, 5
GROUP_MEMBERS = 3
SYSTEMD_PACKAGE_HINT = "install Debian's systemd package (apt-get install systemd), which provides it"


def quiet(_: str) -> None:
    """A progress callback that discards progress."""


def clean_env() -> dict[str, str]:
    """Like systemd's: no INSPECTOR_* or CREDENTIALS_DIRECTORY from the shell running the tests."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def systemd_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin")
    if path is None:
        pytest.fail(f"{name} is missing: {SYSTEMD_PACKAGE_HINT}")
    return path


def venv_under_test() -> Path:
    prefix = Path(sys.prefix)
    if not (prefix / "bin" / "inspector").is_file():
        pytest.fail(f"{prefix}/bin/inspector is missing: install the project into this environment (pip install -e .)")
    return prefix


def do_install(root: Path, **kwargs) -> inst.InstallReport:
    kwargs.setdefault("venv", venv_under_test())
    kwargs.setdefault("progress", quiet)
    return inst.install(root, LINE, **kwargs)


def under(root: Path, path: str | PurePosixPath) -> Path:
    return root.joinpath(*PurePosixPath(path).parts[1:])


def directives(unit_text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (comments skipped), each key's values in order."""
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def exec_start(unit_text: str, line: str) -> list[str]:
    """The unit's ExecStart argv with ``%i`` expanded (the only specifier it uses)."""
    (command,) = directives(unit_text)["ExecStart"]
    return [arg.replace("%i", line) for arg in shlex.split(command)]


def read_environment_file(path: Path) -> dict[str, str]:
    """The subset of systemd's EnvironmentFile= syntax the example uses: KEY=value, # comments."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        text = raw.strip()
        if not text or text[0] in "#;":
            continue
        key, sep, value = text.partition("=")
        assert sep, f"{path}: not KEY=value: {raw!r}"
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


# --------------------------------------------------------------------------- the installed tree


def test_installed_tree_holds_every_file_with_the_prefix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    report = do_install(root, prefix="/srv/inspector/", artifact=ARTIFACT, store=STORE)

    unit = root / "etc/systemd/system/inspector@.service"
    expected = {
        unit,
        root / "etc/inspector/line3.toml",
        root / "etc/inspector/line3.env",
        root / "usr/lib/sysusers.d/inspector.conf",
        root / "usr/lib/tmpfiles.d/inspector.conf",
        root / "srv/inspector/venv",
    }
    assert set(report.written) == expected
    assert report.kept == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"], "the leading / of the prefix escaped the root"
    assert (root / "srv/inspector/venv").resolve() == venv_under_test().resolve()

    installed = unit.read_text()
    template = TEMPLATE.read_text()
    changed = [(a, b) for a, b in zip(template.splitlines(), installed.splitlines()) if a != b]
    assert len(installed.splitlines()) == len(template.splitlines())
    assert changed == [(
        "ExecStart=/opt/inspector/venv/bin/inspector run --line %i --config /etc/inspector/line%i.toml",
        "ExecStart=/srv/inspector/venv/bin/inspector run --line %i --config /etc/inspector/line%i.toml",
    )]
    for path in expected - {root / "srv/inspector/venv"}:
        assert stat.S_IMODE(path.stat().st_mode) == inst.MODE_PUBLIC, path

    assert (root / "etc/inspector/line3.env").read_text() == ENV_EXAMPLE.read_text().replace("<N>", LINE)
    sysusers = (root / "usr/lib/sysusers.d/inspector.conf").read_text().splitlines()
    assert 'u inspector - "Inspector worker" /var/lib/inspector' in sysusers
    assert {"m inspector video", "m inspector render"} <= set(sysusers)
    assert "d /var/lib/inspector 0750 inspector inspector -" in (root / "usr/lib/tmpfiles.d/inspector.conf").read_text()
    assert report.next_commands == (
        "systemd-sysusers /usr/lib/sysusers.d/inspector.conf",
        "systemd-tmpfiles --create /usr/lib/tmpfiles.d/inspector.conf",
        "systemctl daemon-reload",
        "systemctl enable --now inspector@3",
    )
    assert "systemctl enable --now inspector@3" in report.format()


def test_config_loads_with_the_artifact_and_store_and_otherwise_defaults(tmp_path: Path) -> None:
    do_install(tmp_path, artifact=ARTIFACT, store=STORE)
    path = tmp_path / "etc/inspector/line3.toml"
    cfg = load_config(path, {}, {}, None)  # line=None: the file itself must name the line
    assert (cfg.line, cfg.engine.artifact, cfg.banks.store) == (LINE, ARTIFACT, STORE)
    expected = WorkerConfig(line=LINE)
    expected = dataclasses.replace(
        expected, engine=dataclasses.replace(expected.engine, artifact=ARTIFACT),
        banks=dataclasses.replace(expected.banks, store=STORE),
    )
    assert cfg == expected

    # The commented values are the defaults: uncommenting all of them changes nothing.
    commented = re.compile(r"^# (\w+ = .*)$")
    uncommented = "\n".join(commented.sub(r"\1", text) for text in path.read_text().splitlines())
    assert uncommented.count("\n# ") < path.read_text().count("\n# ")
    path.write_text(uncommented)
    assert load_config(path, {}, {}, None) == expected


def test_default_store_is_the_file_store_and_a_missing_artifact_is_a_notice(tmp_path: Path) -> None:
    report = do_install(tmp_path)
    cfg = load_config(tmp_path / "etc/inspector/line3.toml", {}, {}, None)
    assert cfg.banks.store == BankConfig.store == "file:///var/lib/inspector/banks"
    assert cfg.engine.artifact == ""
    assert any("[engine] artifact" in notice for notice in report.notices)


def test_second_install_keeps_the_config_and_force_keeps_a_backup(tmp_path: Path) -> None:
    do_install(tmp_path, artifact=ARTIFACT)
    config = tmp_path / "etc/inspector/line3.toml"
    env = tmp_path / "etc/inspector/line3.env"
    config.write_text(config.read_text() + "\n# edited by the line engineer\n")
    env.write_text("CUDA_VISIBLE_DEVICES=1\n")
    edited = config.read_text()

    again = do_install(tmp_path, artifact="/elsewhere", store=STORE)
    assert config.read_text() == edited and env.read_text() == "CUDA_VISIBLE_DEVICES=1\n"
    assert set(again.kept) == {config, env}
    assert any("--force" in notice for notice in again.notices)
    assert any("not applied" in notice for notice in again.notices)

    forced = do_install(tmp_path, artifact="/elsewhere", store=STORE, force=True)
    backup = config.with_name("line3.toml.bak")
    assert backup.read_text() == edited
    assert {backup, config} <= set(forced.written)
    assert load_config(config, {}, {}, None).engine.artifact == "/elsewhere"
    assert env.read_text() == "CUDA_VISIBLE_DEVICES=1\n", "the environment file is the operator's"
    assert not list(config.parent.glob(".*")), "no staging files are left behind"


def test_a_broken_existing_config_fails_the_install(tmp_path: Path) -> None:
    config = tmp_path / "etc/inspector/line3.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[batch]\nmax_bach = 8\n")
    with pytest.raises(inst.InstallError, match="max_bach"):
        do_install(tmp_path)
    assert not (tmp_path / "etc/systemd").exists(), "nothing is written after a failed check"


def test_a_password_file_becomes_a_credential_and_appears_nowhere_else(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET + "\n")
    report = do_install(root, artifact=ARTIFACT, store=STORE, redis_password_file=secret_file)

    credential = root / "etc/inspector/credentials/redis_password"
    drop_in = root / "etc/systemd/system/inspector@3.service.d/credentials.conf"
    assert {credential, drop_in} <= set(report.written)
    assert credential.read_text() == SECRET + "\n"
    assert stat.S_IMODE(credential.stat().st_mode) == inst.MODE_SECRET
    assert stat.S_IMODE(credential.parent.stat().st_mode) == inst.MODE_SECRET_DIR
    assert directives(drop_in.read_text()) == {
        "LoadCredential": ["redis_password:/etc/inspector/credentials/redis_password"],
    }
    for path in root.rglob("*"):
        if path.is_file() and path != credential:
            assert SECRET.encode() not in path.read_bytes(), f"the password leaked into {path}"

    # What systemd does with the drop-in: the worker finds it as $CREDENTIALS_DIRECTORY/redis_password.
    env = {**clean_env(), "CREDENTIALS_DIRECTORY": str(credential.parent)}
    cfg = load_config(root / "etc/inspector/line3.toml", env, {}, LINE)
    assert cfg.banks.password == SECRET


def test_without_a_password_file_there_is_no_credential(tmp_path: Path) -> None:
    do_install(tmp_path)
    assert not (tmp_path / "etc/inspector/credentials").exists()
    assert not (tmp_path / "etc/systemd/system/inspector@3.service.d").exists()
    assert "LoadCredential" not in directives((tmp_path / "etc/systemd/system/inspector@.service").read_text())


@pytest.mark.parametrize("kwargs, message", [
    ({"line": "3 4"}, "--line"),
    ({"line": ""}, "--line"),
    ({"line": "a" * (inst.MAX_LINE_NAME_LENGTH + 1)}, "--line"),
    ({"line": "../3"}, "--line"),
    ({"prefix": "opt/inspector"}, "--prefix"),
    ({"prefix": "/opt/../etc"}, "--prefix"),
    ({"prefix": "/opt/in spector"}, "--prefix"),
    ({"prefix": "/opt/inspector%i"}, "--prefix"),
    ({"prefix": "/"}, "--prefix"),
    ({"artifact": "models/valve"}, "--artifact"),
    ({"artifact": "/opt/models/../valve"}, "--artifact"),
    ({"store": "redis://:hunter2@127.0.0.1:6379/0"}, "password"),
    ({"store": "redis://127.0.0.1:6379/0?password=hunter2"}, "password"),
    ({"store": "http://127.0.0.1/"}, "--store"),
    ({"venv": Path("/nonexistent/venv")}, "--venv"),
    ({"redis_password_file": Path("/nonexistent/password")}, "--redis-password-file"),
    ({"source": Path("/nonexistent/source")}, "--source"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, kwargs: dict, message: str) -> None:
    line = kwargs.pop("line", LINE)
    kwargs.setdefault("venv", venv_under_test())
    with pytest.raises(inst.InstallError, match=re.escape(message)):
        inst.install(tmp_path, line, progress=quiet, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_relative_or_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(inst.InstallError, match="absolute"):
        inst.install(Path("relative/root"), LINE, venv=inst.VENV_SKIP, progress=quiet)
    with pytest.raises(inst.InstallError, match="not an existing directory"):
        inst.install(tmp_path / "missing", LINE, venv=inst.VENV_SKIP, progress=quiet)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(inst.InstallError, match="empty"):
        do_install(root, redis_password_file=empty)


def test_venv_create_runs_venv_then_a_non_editable_pip_install(tmp_path: Path) -> None:
    commands: list[list[str]] = []
    report = do_install(tmp_path, venv=inst.VENV_CREATE, run_command=commands.append)
    venv = tmp_path / "opt/inspector/venv"
    assert commands == [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin/python"), "-m", "pip", "install", str(REPO)],
    ]
    assert venv in report.written
    assert any("names its own path" in notice for notice in report.notices)


def test_a_failing_pip_is_an_install_error(tmp_path: Path) -> None:
    def fail(command):
        raise subprocess.CalledProcessError(1, command)

    with pytest.raises(inst.InstallError, match="failed"):
        do_install(tmp_path, venv=inst.VENV_CREATE, run_command=fail)


def test_venv_skip_writes_no_environment(tmp_path: Path) -> None:
    report = do_install(tmp_path, venv=inst.VENV_SKIP)
    assert not (tmp_path / "opt").exists()
    assert any("--venv skip" in notice for notice in report.notices)


# --------------------------------------------------------------------------- the unit


def test_repository_unit_has_the_service_contract() -> None:
    found = directives(TEMPLATE.read_text())
    single = {key: values[-1] for key, values in found.items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    assert {"WatchdogSec", "TimeoutStartSec", "TimeoutStopSec", "RestartSec",
            "StartLimitIntervalSec", "StartLimitBurst"} <= set(single)
    assert single["KillSignal"] == "SIGTERM" and single["Restart"] == "on-failure"
    assert (single["User"], single["Group"]) == ("inspector", "inspector")
    assert set(single["SupplementaryGroups"].split()) == {"video", "render"}
    assert single["EnvironmentFile"] == "-/etc/inspector/line%i.env"
    assert single["StateDirectory"] == "inspector"
    assert single["WantedBy"] == "multi-user.target"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality", "RestrictRealtime"):
        assert single[key] == "yes", key
    assert single["ProtectSystem"] == "strict"
    assert "/var/lib/inspector" in single["ReadWritePaths"].split()
    # CUDA needs the device nodes and JIT memory; the reason is written next to the directives.
    assert "PrivateDevices" not in found and "MemoryDenyWriteExecute" not in found
    assert "LoadCredential" not in found, "a missing credential file would stop the unit from starting"
    # The unit's --config is where `inspector run --line N` looks by default.
    argv = exec_start(TEMPLATE.read_text(), LINE)
    assert argv[:4] == ["/opt/inspector/venv/bin/inspector", "run", "--line", LINE]
    assert argv[4:] == ["--config", str(default_config_path(LINE))]


def verify(units: Path, instance: str) -> list[str]:
    """``systemd-analyze verify`` on one instance; the problems it reports about our files."""
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", "--man=no", str(units / instance)],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=clean_env(),
    )
    ours = [line for line in result.stderr.splitlines() if str(units) in line or "inspector@" in line]
    if result.returncode != 0 and not ours:
        ours = result.stderr.splitlines() or [f"exit status {result.returncode}"]
    return ours


def unit_dir_for_verify(tmp_path: Path, root: Path, unit_text: str) -> Path:
    """The unit (and drop-ins) as systemd would see them, ExecStart's program mapped into ``root``.

    systemd-analyze checks that the program exists; on this machine it lives under ``root``.
    """
    units = tmp_path / "units"
    units.mkdir()
    program = exec_start(unit_text, LINE)[0]
    (units / "inspector@.service").write_text(unit_text.replace(f"ExecStart={program} ", f"ExecStart={under(root, program)} "))
    drop_ins = root / "etc/systemd/system/inspector@3.service.d"
    if drop_ins.is_dir():
        shutil.copytree(drop_ins, units / drop_ins.name)
    return units


def test_systemd_analyze_verify_accepts_the_repository_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt/inspector").mkdir(parents=True)
    (root / "opt/inspector/venv").symlink_to(venv_under_test())
    units = unit_dir_for_verify(tmp_path, root, TEMPLATE.read_text())
    assert verify(units, "inspector@3.service") == []


def test_systemd_analyze_verify_accepts_the_installed_unit_and_drop_in(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET)
    do_install(root, prefix="/srv/inspector", artifact=ARTIFACT, store=STORE, redis_password_file=secret_file)
    units = unit_dir_for_verify(tmp_path, root, (root / "etc/systemd/system/inspector@.service").read_text())
    assert (units / "inspector@3.service.d/credentials.conf").is_file()
    assert verify(units, "inspector@3.service") == []


def test_verify_reports_a_directive_systemd_does_not_know(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt/inspector").mkdir(parents=True)
    (root / "opt/inspector/venv").symlink_to(venv_under_test())
    broken = TEMPLATE.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nPrivateDevice=no")
    units = unit_dir_for_verify(tmp_path, root, broken)
    problems = verify(units, "inspector@3.service")
    assert any("PrivateDevice" in line for line in problems), problems


def run_exec_start(root: Path, env: dict[str, str]) -> dict:
    """Run the installed unit's ExecStart, paths mapped into ``root``, with --print-config."""
    argv = exec_start((root / "etc/systemd/system/inspector@.service").read_text(), LINE)
    argv = [str(under(root, arg)) if arg.startswith("/") else arg for arg in argv]
    result = subprocess.run([*argv, "--print-config"], capture_output=True, text=True, env=env,
                            cwd="/", timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_installed_unit_starts_the_worker_with_the_line_config(tmp_path: Path) -> None:
    do_install(tmp_path, artifact=ARTIFACT, store=STORE)
    printed = run_exec_start(tmp_path, clean_env())
    assert (printed["line"], printed["engine"]["artifact"], printed["banks"]["store"]) == (LINE, ARTIFACT, STORE)


def test_the_environment_file_overrides_the_config(tmp_path: Path) -> None:
    do_install(tmp_path, artifact=ARTIFACT, store=STORE)
    env_file = tmp_path / "etc/inspector/line3.env"
    assert read_environment_file(env_file) == {}, "the example sets nothing until an operator uncomments it"
    override = "redis://10.0.0.5:6379/1"
    env_file.write_text(env_file.read_text() + f"INSPECTOR_BANKS_STORE={override}\nINSPECTOR_BATCH_MAX_BATCH=8\n")
    printed = run_exec_start(tmp_path, {**clean_env(), **read_environment_file(env_file)})
    assert printed["banks"]["store"] == override
    assert printed["batch"]["max_batch"] == 8
    assert printed["engine"]["artifact"] == ARTIFACT


# --------------------------------------------------------------------------- account and state directory


def test_sysusers_declares_the_account_and_its_gpu_groups(tmp_path: Path) -> None:
    do_install(tmp_path, venv=inst.VENV_SKIP)
    result = subprocess.run([systemd_tool("systemd-sysusers"), f"--root={tmp_path}"],
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=clean_env())
    assert result.returncode == 0, result.stderr
    passwd = {row.split(":")[0]: row.split(":") for row in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert passwd["inspector"][PASSWD_HOME] == "/var/lib/inspector"
    groups = {row.split(":")[0]: row.split(":")[GROUP_MEMBERS].split(",") for row in (tmp_path / "etc/group").read_text().splitlines()}
    assert "inspector" in groups["video"] and "inspector" in groups["render"]


def test_tmpfiles_creates_the_state_directory_for_the_account(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles must run as root to give the directory to the inspector account")
    do_install(tmp_path, venv=inst.VENV_SKIP)
    for tool, extra in (("systemd-sysusers", []), ("systemd-tmpfiles", ["--create"])):
        result = subprocess.run([systemd_tool(tool), f"--root={tmp_path}", *extra],
                                capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=clean_env())
        assert result.returncode == 0, result.stderr
    uid = int(next(row.split(":")[PASSWD_UID] for row in (tmp_path / "etc/passwd").read_text().splitlines()
                   if row.startswith("inspector:")))
    state = (tmp_path / "var/lib/inspector").stat()
    assert state.st_uid == uid and stat.S_IMODE(state.st_mode) == int(inst.STATE_DIR_MODE, 8)


# --------------------------------------------------------------------------- command line


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="inspector")
    add_install_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_install(parser.parse_args(["install", *argv]))


def test_cli_installs_and_reports_the_next_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--root", str(tmp_path), "--line", LINE, "--venv", str(venv_under_test()), "--artifact", ARTIFACT]
    assert run_cli(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "systemctl enable --now inspector@3" in out and "systemctl daemon-reload" in out
    assert run_cli(argv) == EXIT_OK, "an existing config is kept, not an error"
    assert "kept" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--root", "relative/root", "--line", LINE],
    ["--line", "bad line", "--venv", "skip"],
])
def test_cli_bad_input_exits_2_with_an_error(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    if "--root" not in argv:
        argv = ["--root", str(tmp_path), *argv]
    assert run_cli(argv) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: ")
