"""The one YAML file for `sonoscore listen` and `sonoscore run --send` (docs/design.md, "DICOM network").

`load_config(path, listen=True)` reads it, checks it against `SCHEMA` (JSON Schema 2020-12, with jsonschema: keys,
types, ranges, AE titles, UIDs) and then what a schema cannot say (certificate files that exist, folders that can
be written, destination names used once, the keys each kind of destination needs), and returns a `NetConfig`.
Every problem found is one sentence naming the file and the key; all of them are reported together in one
`ConfigError` (a UserError: exit 2). Relative paths in the file are taken from the file's own folder.

    listen:                          # `sonoscore listen` only
      ae_title: SONOSCORE            # this Storage SCP's AE title
      port: 11112
      bind: 0.0.0.0                  # address to listen on (default 0.0.0.0)
      calling_aes: [SCANNER1]        # calling AE titles accepted; omitted or empty: any
      spool: /var/lib/sonoscore/spool
      quiet_time_s: 30               # a study is complete after this long without a new instance
      keep_instances: false          # keep the received instances after their study is done
      max_associations: 10           # associations at once, all senders together
      max_per_peer: 4                # ... from one address
      reserved_per_calling_ae: 1     # of max_associations, kept for each AE title of calling_aes
      request_timeout_s: 10          # a connection's time to ask for an association; dimse_timeout_s: 30,
      idle_timeout_s: 60             # an association silent this long is aborted
      max_instance_mb: 1024          # a larger instance is refused (0xA700)
      study_attempts: 5              # scoring tries before a study goes to <spool>/failed/ (study_retry_s: 30)
      tls: {certificate: .., private_key: .., ca_certificates: ..}   # with ca_certificates: client certs required
    processing:                      # optional; the command line's --bundle/--device/--backend/--precision win
      bundle: /opt/sonoscore/bundle
      device: cpu                    # cpu, or cuda: the frames stay on the GPU (docs/jetson.md)
      backend: ort
      precision: fp32
    results:
      dir: /var/lib/sonoscore/results   # per study: results.jsonl, summary.json, report.html (listen; default:
                                        # `results` beside the spool)
      uid_root: 1.2.826.0.1.3680043.8.498   # root of the new UIDs of the DICOM results (optional)
      deidentify: false              # PS3.15 basic profile on the DICOM results (research use)
      secondary_capture: true        # also an overlay Secondary Capture
    outbox:
      dir: /var/lib/sonoscore/outbox    # default with listen: `outbox` beside the spool (also when only
                                        # retry is given); run --send needs it
      retry: {first_s: 5, max_s: 300, factor: 2}
    destinations:
      - {name: pacs, type: cstore, host: pacs.example.org, port: 104, called_ae: PACS, calling_ae: SONOSCORE}
      - {name: web, type: stow-rs, url: https://pacs.example.org/dicom-web, username: u, password: p}
"""
from __future__ import annotations

import math
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import backoff
from runtime.errors import UserError

DEFAULT_AE_TITLE = "SONOSCORE"

_AE = {"type": "string", "pattern": r"^(?=.*[^ ])[^\\\x00-\x1f\x7f]{1,16}$",
       "why": "must be an AE title: 1 to 16 characters, not all spaces, without backslash or control characters"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535, "why": "must be a port number from 1 to 65535"}
_PATH = {"type": "string", "minLength": 1, "why": "must be a path"}
_SECONDS = {"type": "number", "minimum": 0, "maximum": 86400, "why": "must be a number of seconds from 0 to 86400"}
_TLS = {"type": "object", "additionalProperties": False,
        "properties": {"certificate": _PATH, "private_key": _PATH, "ca_certificates": _PATH,
                       "verify_hostname": {"type": "boolean", "why": "must be true or false"}}}
_UID_ROOT = {"type": "string", "maxLength": 40, "pattern": r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$",
             "why": "must be a UID root: numbers joined by dots, no leading zeros, at most 40 characters"}

DESTINATION_KEYS = {
    "cstore": {"required": ("host", "port", "called_ae"), "optional": ("calling_ae", "tls", "timeout_s")},
    "stow-rs": {"required": ("url",), "optional": ("username", "password", "token", "tls", "timeout_s")},
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "listen": {"type": "object", "additionalProperties": False, "required": ["ae_title", "port", "spool"],
                   "properties": {"ae_title": _AE, "port": _PORT,
                                  "bind": {"type": "string", "minLength": 1, "why": "must be an address"},
                                  "calling_aes": {"type": "array", "items": _AE,
                                                  "why": "must be a list of AE titles"},
                                  "spool": _PATH, "quiet_time_s": _SECONDS,
                                  "keep_instances": {"type": "boolean", "why": "must be true or false"},
                                  "max_associations": {"type": "integer", "minimum": 1, "maximum": 100,
                                                       "why": "must be a whole number from 1 to 100"},
                                  "max_per_peer": {"type": "integer", "minimum": 1, "maximum": 100,
                                                   "why": "must be a whole number from 1 to 100"},
                                  "reserved_per_calling_ae": {"type": "integer", "minimum": 0, "maximum": 100,
                                                              "why": "must be a whole number from 0 to 100"},
                                  "request_timeout_s": {**_SECONDS, "exclusiveMinimum": 0, "maximum": 3600,
                                                        "why": "must be a number of seconds above 0, at most 3600"},
                                  "dimse_timeout_s": {**_SECONDS, "exclusiveMinimum": 0, "maximum": 3600,
                                                      "why": "must be a number of seconds above 0, at most 3600"},
                                  "idle_timeout_s": {**_SECONDS, "exclusiveMinimum": 0, "maximum": 3600,
                                                     "why": "must be a number of seconds above 0, at most 3600"},
                                  "max_instance_mb": {"type": "number", "exclusiveMinimum": 0, "maximum": 4096,
                                                      "why": "must be a number of megabytes above 0, at most "
                                                             "4096"},
                                  "study_attempts": {"type": "integer", "minimum": 1, "maximum": 100,
                                                     "why": "must be a whole number from 1 to 100"},
                                  "study_retry_s": {**_SECONDS, "exclusiveMinimum": 0,
                                                    "why": "must be a number of seconds above 0, at most 86400"},
                                  "tls": _TLS}},
        "processing": {"type": "object", "additionalProperties": False,
                       "properties": {"bundle": _PATH, "device": {"enum": ["cpu", "cuda"]},
                                      "backend": {"enum": ["ort", "trt"]},
                                      "precision": {"enum": ["fp32", "fp16", "int8"]},
                                      "threads": {"type": "integer", "minimum": 1, "maximum": 1024,
                                                  "why": "must be a whole number from 1 to 1024"}}},
        "results": {"type": "object", "additionalProperties": False,
                    "properties": {"dir": _PATH, "uid_root": _UID_ROOT,
                                   "deidentify": {"type": "boolean", "why": "must be true or false"},
                                   "secondary_capture": {"type": "boolean", "why": "must be true or false"}}},
        "outbox": {"type": "object", "additionalProperties": False,
                   "properties": {"dir": _PATH,
                                  "retry": {"type": "object", "additionalProperties": False,
                                            "properties": {"first_s": {**_SECONDS, "exclusiveMinimum": 0,
                                                                       "why": "must be a number of seconds above "
                                                                              "0, at most 86400"},
                                                           "max_s": {**_SECONDS, "exclusiveMinimum": 0,
                                                                     "why": "must be a number of seconds above 0, "
                                                                            "at most 86400"},
                                                           "factor": {"type": "number", "minimum": 1,
                                                                      "maximum": 10,
                                                                      "why": "must be a number from 1 to 10"}}}}},
        "destinations": {"type": "array", "minItems": 1, "why": "must be a list of at least one destination",
                         "items": {"type": "object", "required": ["name", "type"], "additionalProperties": False,
                                   "properties": {
                                       "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                                "why": "must be a short name: letters, digits, '_', '.', '-'"},
                                       "type": {"enum": sorted(DESTINATION_KEYS)},
                                       "host": {"type": "string", "minLength": 1, "why": "must be a host name "
                                                                                         "or address"},
                                       "port": _PORT, "called_ae": _AE, "calling_ae": _AE,
                                       "url": {"type": "string", "pattern": r"^https?://[^\s/]+",
                                               "why": "must be an http:// or https:// URL"},
                                       "username": {"type": "string", "minLength": 1, "why": "must be a name"},
                                       "password": {"type": "string", "why": "must be a string"},
                                       "token": {"type": "string", "minLength": 1, "why": "must be a string"},
                                       "tls": _TLS,
                                       "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                                                     "why": "must be a number of seconds above 0, at most 3600"}}}},
    },
}


class ConfigError(UserError):
    """A configuration that cannot be used: `errors` holds one sentence per problem; str() is all of them, one a
    line, each line after the first prefixed like the first one is by the command line ("sonoscore: ")."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\nsonoscore: ".join(self.errors))


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    verify_hostname: bool = True

    def server_context(self) -> ssl.SSLContext:
        """For the Storage SCP: its certificate and key; with `ca_certificates`, a client must show a certificate
        signed by one of them."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.certificate), str(self.private_key))
        if self.ca_certificates:
            ctx.load_verify_locations(cafile=str(self.ca_certificates))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For a C-STORE destination: the server is checked against `ca_certificates` (else the system's), its
        host name too unless `verify_hostname` is false; with a certificate and key, they are shown to it."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.ca_certificates) if self.ca_certificates else None)
        ctx.check_hostname = self.verify_hostname
        if self.certificate:
            ctx.load_cert_chain(str(self.certificate), str(self.private_key))
        return ctx


@dataclass(frozen=True)
class ListenConfig:
    ae_title: str
    port: int
    spool: Path
    bind: str = "0.0.0.0"
    calling_aes: tuple[str, ...] = ()
    quiet_time_s: float = 30.0
    keep_instances: bool = False
    max_associations: int = 10
    tls: TlsConfig | None = None
    max_per_peer: int = 4               # associations at once from one address
    reserved_per_calling_ae: int = 1    # of max_associations, kept for each AE title of calling_aes
    request_timeout_s: float = 10.0     # a connection's time to ask for an association (and to release one)
    dimse_timeout_s: float = 30.0       # the wait for the rest of a DIMSE message
    idle_timeout_s: float = 60.0        # an association with no traffic for this long is aborted
    max_instance_mb: float = 1024.0     # a received instance larger than this is refused (0xA700)
    study_attempts: int = 5             # a study whose scoring fails this often goes to <spool>/failed/
    study_retry_s: float = 30.0         # the wait after its first failure; doubling, at most an hour

    @property
    def max_instance_bytes(self) -> int:
        return int(self.max_instance_mb * 1024 * 1024)


@dataclass(frozen=True)
class Destination:
    name: str
    type: str                      # cstore or stow-rs
    host: str | None = None        # cstore
    port: int | None = None
    called_ae: str | None = None
    calling_ae: str = DEFAULT_AE_TITLE
    url: str | None = None         # stow-rs: the DICOMweb service root (STOW-RS posts to <url>/studies)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    timeout_s: float = 30.0

    @property
    def label(self) -> str:
        """How logs name it: its name and kind, never a password."""
        return f"{self.name} ({'C-STORE' if self.type == 'cstore' else 'STOW-RS'})"


@dataclass(frozen=True)
class Retry:
    first_s: float = 5.0
    max_s: float = 300.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1, 2, ...): first_s * factor^(failures-1), at most
        max_s."""
        return backoff.delay(failures, self.first_s, self.max_s, self.factor)


@dataclass(frozen=True)
class NetConfig:
    path: Path
    outbox: Path
    destinations: tuple[Destination, ...]
    retry: Retry = Retry()
    listen: ListenConfig | None = None
    results_dir: Path | None = None
    uid_root: str | None = None
    deidentify: bool = False
    secondary_capture: bool = True
    bundle: Path | None = None
    device: str = "cpu"
    backend: str = "ort"
    precision: str = "fp32"
    threads: int | None = None


def load_config(path: str | os.PathLike, *, listen: bool = False) -> NetConfig:
    """Read and check the YAML file at `path`; `listen`: for `sonoscore listen` (the `listen` section is then
    required; `outbox.dir` and `results.dir` default to `outbox` and `results` beside the spool). Raises ConfigError
    with one sentence per problem."""
    path = Path(path)
    name = str(path)
    try:
        import yaml
    except ImportError:
        raise UserError("reading the configuration needs pyyaml; install it with pip install "
                        "'sonoscore[dicom]'") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"configuration {name} does not exist; give the path of a YAML file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"configuration {name} is a folder; give the path of a YAML file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "it is not UTF-8 text"
        raise ConfigError([f"configuration {name} cannot be read ({why})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError([f"{name} is not valid YAML{where} ({problem}); correct it"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{name} must be a mapping of sections (listen, processing, results, outbox, "
                           f"destinations), not a {_kind(doc)}"])
    errors = _schema_errors(doc, name)
    if listen:
        for section in ("listen",):
            if section not in doc:
                errors.append(f"{name}: section '{section}' is missing; `sonoscore listen` needs it (ae_title, "
                              f"port, spool)")
    base = path.resolve().parent
    if errors:
        # What no schema can see is still worth saying with the rest, where the document is whole enough to look
        try:
            _, more = _build(doc, name, base, listen)
        except (KeyError, TypeError, AttributeError, ValueError):
            more = []
        raise ConfigError(errors + [e for e in more if e not in errors])
    cfg, errors = _build(doc, name, base, listen)
    if errors:
        raise ConfigError(errors)
    return cfg


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                            type(value).__name__)


def _where(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _schema_errors(doc: dict, name: str) -> list[str]:
    import jsonschema
    validator = jsonschema.Draft202012Validator(SCHEMA)
    out: list[str] = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = _where(error.absolute_path)
        schema = error.schema if isinstance(error.schema, dict) else {}
        if error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            key = f"{where}.{missing}" if where else missing
            out.append(f"{name}: '{key}' is missing; add it")
        elif error.validator == "additionalProperties":
            allowed = sorted(schema.get("properties", {}))
            extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
            for key in extra or ["?"]:
                full = f"{where}.{key}" if where else str(key)
                out.append(f"{name}: unknown key '{full}' (known here: {', '.join(allowed)}); remove or "
                           f"correct it")
        elif error.validator == "enum":
            out.append(f"{name}: '{where}' is {_show(error.instance)}; it must be one of "
                       f"{', '.join(map(str, error.validator_value))}")
        elif error.validator == "type" and error.validator_value == "object":
            out.append(f"{name}: '{where or 'the file'}' must be a mapping of keys, not a {_kind(error.instance)}")
        elif "why" in schema:
            out.append(f"{name}: '{where}' is {_show(error.instance)}; it {schema['why']}")
        else:
            out.append(f"{name}: '{where}': {error.message}")
    return out


def _build(doc: dict, name: str, base: Path, listen: bool) -> tuple[NetConfig | None, list[str]]:
    """The checked document as a NetConfig, and the problems no schema can see."""
    errors: list[str] = []

    def path_of(value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else base / p

    def tls_of(section: dict | None, key: str, server: bool) -> TlsConfig | None:
        if not section:
            return None
        before = len(errors)
        files = {k: path_of(section[k]) for k in ("certificate", "private_key", "ca_certificates") if k in section}
        for k, p in files.items():
            if not p.is_file():
                errors.append(f"{name}: '{key}.{k}' names {p}, which is not a file; give the PEM file's path")
            elif not os.access(p, os.R_OK):
                errors.append(f"{name}: '{key}.{k}' names {p}, which this user cannot read")
        if ("certificate" in files) != ("private_key" in files):
            errors.append(f"{name}: '{key}' gives a certificate without its private key (or the other way round); "
                          f"give both")
        if server and "certificate" not in files:
            errors.append(f"{name}: '{key}' needs 'certificate' and 'private_key' (the server's own)")
        tls = TlsConfig(files.get("certificate"), files.get("private_key"), files.get("ca_certificates"),
                        bool(section.get("verify_hostname", True)))
        if len(errors) == before:
            try:
                tls.server_context() if server else tls.client_context()
            except (ssl.SSLError, OSError, ValueError) as e:
                errors.append(f"{name}: '{key}': the certificates cannot be loaded ({_ssl_reason(e)}); give PEM "
                              f"files that belong together")
        return tls

    def folder(key: str, value: str) -> Path:
        p = path_of(value)
        anc = p
        while not anc.exists() and anc.parent != anc:
            anc = anc.parent
        if p.exists() and not p.is_dir():
            errors.append(f"{name}: '{key}' names {p}, which is a file; give a folder")
        elif not anc.is_dir():
            errors.append(f"{name}: '{key}' names {p}, which cannot be made ({anc} is not a folder)")
        elif not os.access(anc, os.W_OK | os.X_OK):
            errors.append(f"{name}: '{key}' names {p}, which this user cannot write ({anc} is not writable)")
        return p

    lc = None
    if "listen" in doc:
        ls = doc["listen"]
        lc = ListenConfig(ae_title=ls["ae_title"].strip(), port=int(ls["port"]), spool=folder("listen.spool",
                                                                                           ls["spool"]),
                          bind=ls.get("bind", "0.0.0.0"),
                          calling_aes=tuple(a.strip() for a in ls.get("calling_aes") or ()),
                          quiet_time_s=float(ls.get("quiet_time_s", 30.0)),
                          keep_instances=bool(ls.get("keep_instances", False)),
                          max_associations=int(ls.get("max_associations", 10)),
                          tls=tls_of(ls.get("tls"), "listen.tls", server=True),
                          max_per_peer=int(ls.get("max_per_peer", 4)),
                          reserved_per_calling_ae=int(ls.get("reserved_per_calling_ae", 1)),
                          request_timeout_s=float(ls.get("request_timeout_s", 10.0)),
                          dimse_timeout_s=float(ls.get("dimse_timeout_s", 30.0)),
                          idle_timeout_s=float(ls.get("idle_timeout_s", 60.0)),
                          max_instance_mb=float(ls.get("max_instance_mb", 1024.0)),
                          study_attempts=int(ls.get("study_attempts", 5)),
                          study_retry_s=float(ls.get("study_retry_s", 30.0)))
        reserved = lc.reserved_per_calling_ae * len(set(lc.calling_aes))
        if reserved >= lc.max_associations:
            errors.append(f"{name}: 'listen.reserved_per_calling_ae' ({lc.reserved_per_calling_ae}) for each of "
                          f"the {len(set(lc.calling_aes))} calling AE title(s) keeps {reserved} of "
                          f"'listen.max_associations' ({lc.max_associations}), leaving none to share; raise "
                          f"max_associations or lower reserved_per_calling_ae")
    outbox_doc = doc.get("outbox") or {}
    if "dir" in outbox_doc:
        outbox = folder("outbox.dir", outbox_doc["dir"])
    elif lc is not None:                     # beside the spool (also when only outbox.retry is given)
        outbox = folder("outbox.dir", str(lc.spool.parent / "outbox"))
    else:
        outbox = None
        where = "'outbox.dir' is missing" if "outbox" in doc else "section 'outbox' is missing"
        errors.append(f"{name}: {where}; add outbox.dir, the folder where results wait until every destination "
                      f"has them (`run --send` has no spool to put it beside)")
    if "destinations" not in doc:
        errors.append(f"{name}: section 'destinations' is missing; name at least one PACS (type cstore or stow-rs)")
    dests: list[Destination] = []
    seen: set[str] = set()
    default_calling = lc.ae_title if lc else DEFAULT_AE_TITLE
    for i, d in enumerate(doc.get("destinations") or []):
        key = f"destinations[{i}]"
        if not isinstance(d, dict) or d.get("type") not in DESTINATION_KEYS or not isinstance(d.get("name"), str):
            continue    # the schema has said what is wrong with it
        if d["name"] in seen:
            errors.append(f"{name}: destination name '{d['name']}' is used twice; give each destination its own")
        seen.add(d["name"])
        spec = DESTINATION_KEYS[d["type"]]
        for k in spec["required"]:
            if k not in d:
                errors.append(f"{name}: '{key}.{k}' is missing; a {d['type']} destination needs "
                              f"{', '.join(spec['required'])}")
        for k in d:
            if k not in ("name", "type", *spec["required"], *spec["optional"]):
                errors.append(f"{name}: '{key}.{k}' does not apply to a {d['type']} destination (its keys: "
                              f"{', '.join((*spec['required'], *spec['optional']))}); remove it")
        if d["type"] == "stow-rs":
            if "token" in d and ("username" in d or "password" in d):
                errors.append(f"{name}: '{key}' gives both a token and a username/password; give one of them")
            if ("username" in d) != ("password" in d):
                errors.append(f"{name}: '{key}' gives a username without a password (or the other way round); "
                              f"give both")
            if "tls" in d and not str(d.get("url", "")).startswith("https://"):
                errors.append(f"{name}: '{key}.tls' is given but the url is not https://; use https or remove tls")
        dests.append(Destination(name=d["name"], type=d["type"], host=d.get("host"), port=d.get("port"),
                                 called_ae=(d.get("called_ae") or "").strip() or None,
                                 calling_ae=(d.get("calling_ae") or default_calling).strip(),
                                 url=(d.get("url") or "").rstrip("/") or None, username=d.get("username"),
                                 password=d.get("password"), token=d.get("token"),
                                 tls=tls_of(d.get("tls"), f"{key}.tls", server=False),
                                 timeout_s=float(d.get("timeout_s", 30.0))))
    retry_doc = (doc.get("outbox") or {}).get("retry") or {}
    retry = Retry(float(retry_doc.get("first_s", 5.0)), float(retry_doc.get("max_s", 300.0)),
                  float(retry_doc.get("factor", 2.0)))
    if retry.max_s < retry.first_s:
        errors.append(f"{name}: 'outbox.retry.max_s' ({retry.max_s:g}) is below 'outbox.retry.first_s' "
                      f"({retry.first_s:g}); make it at least as large")
    res = doc.get("results") or {}
    results_dir = (folder("results.dir", res["dir"]) if "dir" in res
                   else folder("results.dir", str(lc.spool.parent / "results")) if lc is not None else None)
    proc = doc.get("processing") or {}
    bundle = path_of(proc["bundle"]) if "bundle" in proc else None
    if lc is not None:
        places = {"listen.spool": lc.spool, "outbox.dir": outbox, "results.dir": results_dir}
        real = {}
        for k, p in places.items():
            if p is None:
                continue
            r = os.path.realpath(p)
            for k2, r2 in real.items():
                if r == r2 or r.startswith(r2 + os.sep) or r2.startswith(r + os.sep):
                    errors.append(f"{name}: '{k2}' and '{k}' overlap ({p}); give each its own folder")
            real[k] = r
        if not math.isfinite(lc.quiet_time_s):
            errors.append(f"{name}: 'listen.quiet_time_s' must be a finite number of seconds")
    if errors:
        return None, errors
    return NetConfig(path=Path(name), outbox=outbox, destinations=tuple(dests), retry=retry, listen=lc,
                     results_dir=results_dir, uid_root=res.get("uid_root"),
                     deidentify=bool(res.get("deidentify", False)),
                     secondary_capture=bool(res.get("secondary_capture", True)), bundle=bundle,
                     device=proc.get("device", "cpu"), backend=proc.get("backend", "ort"),
                     precision=proc.get("precision", "fp32"),
                     threads=proc.get("threads")), []


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
        return str(e.reason).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
