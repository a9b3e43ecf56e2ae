"""sonoscore on the DICOM network: studies in by C-STORE, results out to a PACS.

    config.py   the one YAML file for `sonoscore listen` and `sonoscore run --send` (validated on start, one
                sentence per error)
    spool.py    received instances on disk, per study (written and fsynced before the C-STORE is acknowledged),
                and which of them a finished study round covered
    listen.py   `sonoscore listen`: the Storage SCP (pynetdicom) and the worker that scores a study once it has
                been quiet for the configured time, then makes its summary, report and DICOM results
    scp.py      the Storage SCP's wire side: SOP classes and transfer syntaxes accepted, C-STORE statuses, the
                peer of an event, pynetdicom's receive folder and TLS handshake
    listen_status.py  `sonoscore listen --status`: the spool's studies and the outbox, read only
    outbox.py   the persistent outbox: results wait there until every destination has them (PACS outage, restart)
    senders.py  the destinations: C-STORE SCU (pynetdicom) and DICOMweb STOW-RS (dicomweb-client)
    study.py    one study round: the instances as one source through the `run` pipeline and sinks, and its results

pynetdicom, dicomweb-client and pyyaml come with the `dicom` extra and are imported only by these commands.
Nothing here writes or logs a patient identifier: studies, instances and outbox entries are named by keyed
hashes of their UIDs (`uid_key`), and log lines name those.
"""
from __future__ import annotations

import hashlib
import hmac


def uid_key(uid: str, length: int = 16) -> str:
    """The opaque name of a DICOM UID on disk and in logs: the first `length` hex digits of its HMAC-SHA256 under
    the installation's secret salt (runtime.sources.installation_salt, the key of the source ids). Keyed, so whoever
    holds a UID (the scanner's log, a PACS query, another site) cannot find its study's folder or log lines by
    hashing it, and a name reveals nothing without the salt; the same on this installation after a restart (the
    spool and the outbox are found again by it)."""
    from runtime.sources import installation_salt
    text = str(uid).strip().encode("ascii", "replace")
    return hmac.new(installation_salt(), text, hashlib.sha256).hexdigest()[:length]
