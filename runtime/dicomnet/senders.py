"""Destinations: where the outbox delivers DICOM results (runtime/dicomnet/outbox.py).

A sender takes files (DICOM Part 10, as the outbox holds them) and calls `on_result(path, Outcome)` for each one
as soon as the destination has answered for it, so the outbox can note a delivery the moment it happens. When
the destination cannot be reached or the link breaks (connection refused, association rejected or aborted, a
timeout, an HTTP 5xx or an authentication failure) it raises `Unreachable` with the reason in a clause: what is
left is tried again later, with back-off. A destination that answers but refuses one instance (a C-STORE failure
status, a STOW-RS FailedSOPSequence or HTTP 4xx) gives that instance an Outcome with `ok` False.

    CStoreSender   C-STORE SCU (pynetdicom): one association per delivery round, a presentation context per SOP
                   class and transfer syntax of the files (plus Explicit and Implicit VR Little Endian), TLS when
                   the destination has `tls`.
    StowSender     DICOMweb STOW-RS (dicomweb-client): one POST per instance to <url>/studies, basic or bearer
                   authentication, the server checked against `tls.ca_certificates`; dicomweb-client's own retries
                   are off (the outbox retries).

Nothing said here names a patient: reasons are status codes and network errors, never a dataset's content.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.dicomnet.config import Destination


class Unreachable(Exception):
    """The destination could not be reached or the link broke; str() is the reason, a clause."""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str = ""        # a warning status on success, or why the destination refused the instance


# C-STORE statuses that store the instance (PS3.4 B.2.3): success and the warnings.
_CSTORE_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_CSTORE_MEANING = {0x0117: "invalid SOP instance", 0x0122: "SOP class not supported", 0x0124: "not authorised",
                   0x0210: "duplicate invocation", 0x0211: "unrecognised operation", 0x0212: "mistyped argument",
                   0xB000: "coercion of data elements", 0xB006: "elements discarded",
                   0xB007: "data set does not match SOP class"}


def cstore_meaning(status: int) -> str:
    if status in _CSTORE_MEANING:
        return _CSTORE_MEANING[status]
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return "failure"


def quiet_library_logs() -> None:
    """pynetdicom (at debug level) and dicomweb-client (at info level) log datasets and study UIDs: keep them to
    errors, which name neither."""
    for name in ("pynetdicom", "dicomweb_client"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_sender(dest: Destination):
    return CStoreSender(dest) if dest.type == "cstore" else StowSender(dest)


class CStoreSender:
    def __init__(self, dest: Destination):
        self.dest = dest

    def send(self, paths: list[Path], on_result: Callable[[Path, Outcome], None]) -> None:
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt
        quiet_library_logs()
        d = self.dest
        ae = AE(ae_title=d.calling_ae)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, d.timeout_s)
        syntaxes: dict[str, list[str]] = {}
        for p in paths:
            meta = read_file_meta_info(p)
            ts = syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), [])
            for t in (str(meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if t not in ts:
                    ts.append(t)
        for sop_class, ts in list(syntaxes.items())[:128]:
            ae.add_requested_context(sop_class, ts)
        tls_args = (d.tls.client_context(), d.host) if d.tls else None
        connected = []
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.called_ae, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
        except OSError as e:  # a TLS handshake that fails, an address that cannot be resolved
            raise Unreachable(f"no association ({e.strerror or e})") from None
        if not assoc.is_established:
            raise Unreachable(_association_failure(assoc, d, bool(connected)))
        try:
            for p in paths:
                status = assoc.send_c_store(p)
                code = status.get("Status") if status is not None else None
                if code is None:
                    raise Unreachable("the association broke off (no C-STORE response)")
                code = int(code)
                if code in _CSTORE_STORED:
                    on_result(p, Outcome(True, "" if code == 0 else f"warning 0x{code:04X} "
                                                                    f"({cstore_meaning(code)})"))
                else:
                    on_result(p, Outcome(False, f"C-STORE status 0x{code:04X} ({cstore_meaning(code)})"))
                if not assoc.is_established:
                    raise Unreachable("the association broke off")
        finally:
            if assoc.is_established:
                assoc.release()


def _association_failure(assoc, dest: Destination, connected: bool) -> str:
    """Why no association was made, as a clause. pynetdicom reports a TCP connection that was refused or not
    answered as an aborted association; when none was opened (`connected` False, from EVT_CONN_OPEN), the
    connection is tried once more to say which (a PACS that is down, a wrong port, a firewall)."""
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        diag = {1: "no reason given", 2: "application context not supported", 3: "calling AE title not recognised",
                7: "called AE title not recognised"}
        reason = diag.get(getattr(rsp, "diagnostic", None), "rejected")
        return f"the association was rejected ({reason})"
    down = None if connected else connection_problem(dest.host, dest.port, dest.timeout_s)
    if down:
        return down
    if assoc.is_aborted:
        return "the association was aborted (no presentation context accepted, or the peer hung up)"
    return "no association (the peer did not answer the association request)"


def connection_problem(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to host:port cannot be made, as a clause (None: it can). A refused connection means
    nothing listens there: the PACS is not running or the port is not its DICOM port."""
    import socket
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            return None
    except ConnectionRefusedError:
        return f"{host}:{port} refused the connection (is the PACS running, and is {port} its DICOM port?)"
    except socket.timeout:
        return f"{host}:{port} did not answer within {min(timeout_s, 10.0):g} s (a firewall, or the wrong host?)"
    except socket.gaierror:
        return f"the host name {host} cannot be resolved (check the destination's host)"
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"


class StowSender:
    def __init__(self, dest: Destination):
        self.dest = dest
        self._client = None

    def _make_client(self):
        from dicomweb_client.api import DICOMwebClient
        quiet_library_logs()
        d = self.dest
        client = DICOMwebClient(url=d.url, session=http_session(d), timeout=d.timeout_s)
        client.set_http_retry_params(retry=False)
        return client

    def send(self, paths: list[Path], on_result: Callable[[Path, Outcome], None]) -> None:
        import pydicom
        import requests
        if self._client is None:
            self._client = self._make_client()
        for p in paths:
            ds = pydicom.dcmread(p)
            try:
                rsp = self._client.store_instances([ds])
            except requests.HTTPError as e:
                code = e.response.status_code if e.response is not None else 0
                if code >= 500 or code in (401, 403, 407, 408, 429):
                    raise Unreachable(f"HTTP {code} ({_http_reason(e)})") from None
                on_result(p, Outcome(False, f"HTTP {code} ({_http_reason(e)})"))
                continue
            except requests.RequestException as e:
                raise Unreachable(_request_reason(e)) from None
            failed = rsp.get("FailedSOPSequence") if rsp is not None else None
            if failed:
                reason = failed[0].get("FailureReason")
                on_result(p, Outcome(False, "STOW-RS failure" + (f" 0x{int(reason):04X}" if reason else "")))
            else:
                on_result(p, Outcome(True))


def http_session(d: Destination):
    """A requests session for a STOW-RS destination: its basic or bearer authentication and TLS settings."""
    import requests
    session = requests.Session()
    if d.username is not None:
        session.auth = (d.username, d.password or "")
    if d.token:
        session.headers["Authorization"] = f"Bearer {d.token}"
    if d.tls:
        session.verify = str(d.tls.ca_certificates) if d.tls.ca_certificates else True
        if d.tls.certificate:
            session.cert = (str(d.tls.certificate), str(d.tls.private_key))
    return session


def _http_reason(e) -> str:
    r = getattr(e, "response", None)
    return (getattr(r, "reason", None) or "error").lower()


def _request_reason(e: BaseException) -> str:
    import requests
    if isinstance(e, requests.exceptions.SSLError):
        return "the TLS handshake failed"
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError):
        return "connection refused or the server is unreachable"
    return type(e).__name__
