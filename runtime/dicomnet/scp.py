"""The wire side of `sonoscore listen`'s Storage SCP (runtime/dicomnet/listen.py's Listener holds its handlers):
what it accepts (the ultrasound SOP classes, Verification, the transfer syntaxes the DICOM source can decode here),
the status data sets a C-STORE is answered with, who is at the other end of an event (calling AE title, address,
printable), where a received data set is (a file in the spool's tmp/, read header only), and how pynetdicom is set up
for that (its receive folder, a TLS handshake with a timeout).
"""
from __future__ import annotations

from pathlib import Path

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
ACCEPTED_SOP_CLASSES = (US_IMAGE, US_MULTIFRAME, US_IMAGE_RETIRED, US_MULTIFRAME_RETIRED)
VERIFICATION = "1.2.840.10008.1.1"


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data pydicom can decode here (what runtime/sources/dicom.py reads):
    uncompressed ones always, compressed ones when their decoder plugin is installed; deflate never (the DICOM
    source refuses it). Uncompressed first, so a sender that can do both sends those."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                             ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    first = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    out = list(first)
    for ts in AllTransferSyntaxes:
        if ts in first or ts == DeflatedExplicitVRLittleEndian:
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


def _status(code: int, comment: str | None = None):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds

def _calling(event) -> str:
    try:
        return _printable(str(event.assoc.requestor.ae_title).strip())
    except AttributeError:
        return "?"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:16]


def _peer(assoc) -> str:
    try:
        return str(assoc.requestor.address)
    except AttributeError:
        return "?"


def _received_path(event) -> Path | None:
    """The file pynetdicom received the data set into (chunked receive), or None (received into memory)."""
    try:
        return Path(event.dataset_path)
    except (AttributeError, ValueError, TypeError):
        return None


def _header_of(path: Path):
    """The received data set's header (not its pixels), read leniently: odd values do not stop it here."""
    import warnings
    import pydicom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _receive_into(folder: Path) -> None:
    """pynetdicom writes a data set being received (STORE_RECV_CHUNKED_DATASET) to a NamedTemporaryFile: put it in
    the spool's tmp/ (named recv-*, cleared on start), so the instance is renamed into the spool, not copied, and
    a received file never lands in a shared /tmp."""
    import functools
    import tempfile
    from pynetdicom import dimse_messages
    from runtime.dicomnet.spool import RECEIVING
    dimse_messages.NamedTemporaryFile = functools.partial(tempfile.NamedTemporaryFile, dir=str(folder),
                                                          prefix=RECEIVING)


def _bounded_handshake(server, ssl_context, timeout_s: float) -> None:
    """pynetdicom does the TLS handshake in the server's accept loop, without a timeout: one connection that never
    starts it would hold every other. Here it has timeout_s."""
    def get_request():
        sock, address = server.socket.accept()
        sock.settimeout(timeout_s)
        try:
            sock = ssl_context.wrap_socket(sock, server_side=True)
        except Exception:
            sock.close()
            raise OSError("TLS handshake failed or timed out") from None
        sock.settimeout(None)
        return sock, address
    server.get_request = get_request
