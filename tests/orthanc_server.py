"""A real Orthanc for the tests (Debian's `orthanc` and `orthanc-dicomweb` packages; .ci/run installs them when
missing): started on free loopback ports with its own temporary configuration and storage, DICOM and REST (and
DICOMweb, when the plugin is installed) enabled, stopped at the end. Restarting it keeps its storage (a PACS that
goes down and comes back).

Every instance Orthanc receives, a copy of one it holds included, is counted: a Lua `ReceivedInstanceFilter` prints
its SOP Instance UID and how it came (DicomProtocol: C-STORE; RestApi or Plugins: STOW-RS) to Orthanc's log, which
`received()` reads over all its starts.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
_MARK = "SONOSCORE-RECEIVED"
_LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  print('{_MARK} ' .. tostring(dicom.SOPInstanceUID) .. ' ' .. tostring(origin.RequestOrigin))
  return true
end
"""


class OrthancUnavailable(RuntimeError):
    """Orthanc is not installed or does not start here; the message says why (the tests skip with it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    found = sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))
    return found[0] if found else None


class Orthanc:
    def __init__(self, root: Path, aet: str = "ORTHANC"):
        if ORTHANC is None:
            raise OrthancUnavailable("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run "
                                     "installs them)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.plugin = dicomweb_plugin()
        (self.root / "count.lua").write_text(_LUA)
        config = {"Name": "sonoscore-test", "StorageDirectory": str(self.root / "db"),
                  "IndexDirectory": str(self.root / "db"), "DicomAet": aet, "DicomPort": self.dicom_port,
                  "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomCheckCalledAet": True, "LuaScripts": [str(self.root / "count.lua")],
                  "Plugins": [self.plugin] if self.plugin else [], "SaveJobs": False,
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.logs: list[Path] = []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str | None:
        return f"{self.url}/dicom-web" if self.plugin else None

    def start(self, timeout: float = 60.0) -> "Orthanc":
        log = self.root / f"orthanc-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([ORTHANC, "--verbose", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise OrthancUnavailable(f"Orthanc exited at start ({self.proc.returncode}): {' | '.join(tail)}")
            try:
                self.get("/system")
                return self
            except (OSError, ValueError):
                time.sleep(0.2)
        self.stop()
        raise OrthancUnavailable(f"Orthanc did not answer on port {self.http_port} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # -- REST --------------------------------------------------------------------------------------------------

    def _request(self, path: str, data: bytes | None = None):
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self._request(path))

    def post(self, path: str, body) -> object:
        return json.loads(self._request(path, json.dumps(body).encode()))

    def instances(self, **query) -> list[dict]:
        """Instances whose main tags match `query` (e.g. StudyInstanceUID=...), expanded."""
        return self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of a study, with its Modality (from its series) and its tags."""
        out = []
        for study in self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}):
            for series in self.get(f"/studies/{study}/series"):
                for inst in self.get(f"/series/{series['ID']}/instances"):
                    inst["Modality"] = series["MainDicomTags"].get("Modality")
                    out.append(inst)
        return out

    def file(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def dataset(self, instance_id: str):
        import io

        import pydicom
        return pydicom.dcmread(io.BytesIO(self.file(instance_id)))

    def received(self) -> collections.Counter:
        """(SOP Instance UID, origin) -> how many times Orthanc received it, over all its starts."""
        counts: collections.Counter = collections.Counter()
        pattern = re.compile(rf"{_MARK} (\S+) (\S+)")
        for log in self.logs:
            if log.exists():
                for m in pattern.finditer(log.read_text(errors="replace")):
                    counts[(m.group(1), m.group(2))] += 1
        return counts
