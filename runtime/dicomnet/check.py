"""`sonoscore listen --config FILE --check-config`: the first-contact check, without listening or a bundle.

It reads the configuration (every problem one sentence, exit 2, as `listen` itself), makes each folder it names
(listen.spool, outbox.dir, results.dir) and writes a file there, then asks every destination whether it answers:
a C-STORE destination gets a C-ECHO (Verification) from the configured calling AE title, a STOW-RS destination a
QIDO-RS query for one study at `<url>/studies` with its credentials. One line per check on stdout; each problem one
sentence on stderr naming the folder or the destination and what to do. Exit 0 when everything passed, 2 when not.

A file without a `listen` section is checked as a `run --send` configuration (outbox and destinations).
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from runtime.dicomnet.config import Destination, NetConfig, load_config
from runtime.dicomnet.senders import connection_problem, http_session, quiet_library_logs

VERIFICATION = "1.2.840.10008.1.1"


def has_listen_section(path: str | os.PathLike) -> bool:
    """Whether the YAML file has a `listen` section (False when it cannot be read: load_config then says why)."""
    try:
        import yaml
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - load_config reports the file's problem in one sentence
        return True
    return isinstance(doc, dict) and "listen" in doc


def folder_problem(folder: Path) -> str | None:
    """Make the folder (and its parents) and write a file in it; the reason when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sonoscore-check-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def echo_problem(d: Destination) -> str | None:
    """C-ECHO the C-STORE destination as sonoscore would associate with it; None when it answered success."""
    from pynetdicom import AE, evt
    quiet_library_logs()
    ae = AE(ae_title=d.calling_ae)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, min(d.timeout_s, 30.0))
    ae.add_requested_context(VERIFICATION)
    tls_args = (d.tls.client_context(), d.host) if d.tls else None
    connected = []
    try:
        assoc = ae.associate(d.host, d.port, ae_title=d.called_ae, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
    except OSError as e:
        return f"no association with {d.host}:{d.port} ({e.strerror or e}); check the host and the TLS settings"
    if not assoc.is_established:
        if assoc.is_rejected:
            diag = getattr(getattr(assoc.acceptor, "primitive", None), "diagnostic", None)
            if diag == 3:
                return (f"the PACS rejected the association: it does not know the calling AE title "
                        f"'{d.calling_ae}'; register it in the PACS (with this machine's address)")
            if diag == 7:
                return (f"the PACS rejected the association: its AE title is not '{d.called_ae}'; set called_ae "
                        f"to the PACS's AE title")
            return "the PACS rejected the association; check called_ae, calling_ae and the PACS's list of peers"
        down = None if connected else connection_problem(d.host, d.port, d.timeout_s)
        if down:
            return down
        return (f"{d.host}:{d.port} took the connection but no association was made (it does not accept "
                f"Verification, expects TLS, or is not a DICOM port)")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = status.get("Status") if status is not None else None
    if code is None:
        return "the PACS accepted the association but did not answer the C-ECHO"
    if int(code) != 0:
        return f"the PACS answered the C-ECHO with status 0x{int(code):04X}"
    return None


def stow_problem(d: Destination) -> str | None:
    """Ask the DICOMweb service for one study (QIDO-RS), as sonoscore would authenticate; None when it answered."""
    import requests
    quiet_library_logs()
    try:
        r = http_session(d).get(f"{d.url}/studies", params={"limit": "1"},
                                headers={"Accept": "application/dicom+json"}, timeout=min(d.timeout_s, 30.0))
    except requests.exceptions.SSLError:
        return f"the TLS handshake with {d.url} failed; check tls.ca_certificates (and the client certificate)"
    except requests.Timeout:
        return f"{d.url} did not answer within {min(d.timeout_s, 30.0):g} s; check the url and the network"
    except requests.RequestException:
        return (f"{d.url} cannot be reached (connection refused or no such host); is the server running and the "
                f"url right?")
    if r.status_code in (401, 403):
        return f"{d.url} refused the credentials (HTTP {r.status_code}); check username/password or token"
    if r.status_code == 404:
        return f"{d.url} has no DICOMweb service at /studies (HTTP 404); give the DICOMweb root as url"
    if r.status_code >= 500:
        return f"{d.url} answered HTTP {r.status_code} (a server error); look at the server's log"
    return None


def check_config(path: str | os.PathLike, out=None, err=None) -> int:
    """Run the checks and say what they found; the exit code (0: all passed, 2: not)."""
    out = out or sys.stdout
    err = err or sys.stderr
    listen = has_listen_section(path)
    cfg: NetConfig = load_config(path, listen=listen)          # ConfigError: one sentence per problem, exit 2
    print(f"configuration {cfg.path}: valid" + ("" if listen else " (no listen section: checked for run --send)"),
          file=out)
    problems = 0
    folders = [("outbox.dir", cfg.outbox), ("results.dir", cfg.results_dir)]
    if cfg.listen is not None:
        folders.insert(0, ("listen.spool", cfg.listen.spool))
    for key, folder in folders:
        if folder is None:
            continue
        why = folder_problem(folder)
        if why:
            problems += 1
            print(f"sonoscore: {cfg.path}: '{key}' names {folder}, which cannot be made or written ({why}); give a "
                  f"folder this user can write", file=err)
        else:
            print(f"folder {key} {folder}: ready", file=out)
    for d in cfg.destinations:
        if d.type == "cstore":
            what = f"destination {d.label}, AE '{d.called_ae}' at {d.host}:{d.port}, calling AE '{d.calling_ae}'"
            why = echo_problem(d)
            ok = "C-ECHO answered with success"
        else:
            what = f"destination {d.label} at {d.url}"
            why = stow_problem(d)
            ok = "the DICOMweb service answered"
        if why:
            problems += 1
            print(f"sonoscore: {what}: {why}", file=err)
        else:
            print(f"{what}: {ok}", file=out)
    if problems:
        print(f"sonoscore: {problems} problem(s) found; fix them and run --check-config again", file=err)
        return 2
    print("every folder and destination is ready", file=out)
    return 0
