"""`sonoscore listen --config FILE --status`: what the spool and the outbox hold (waiting, scoring, done and failed
studies; batches not yet delivered per destination), read only, whether the listener runs or not.
"""
from __future__ import annotations

import time
from pathlib import Path

from runtime.dicomnet.outbox import Outbox
from runtime.dicomnet.spool import Spool

DONE_LISTED = 20


def status_command(config_path: str | Path) -> int:
    """`sonoscore listen --config FILE --status`: the spool's studies (waiting, scoring, done, failed with why), their
    counts, and the outbox's waiting batches per destination; read only (nothing made or changed), whether the
    listener runs or not; exit 0."""
    import json
    from runtime.dicomnet.config import load_config
    cfg = load_config(config_path, listen=True)
    spool = Spool(cfg.listen.spool)
    now = time.time()
    state = spool.state()
    scoring = state.get("scoring") if state else None
    waiting, done = [], []
    for study in spool.study_keys():
        pending = spool.pending(study)
        if pending and study != scoring:
            failures = spool.failures(study) or {}
            note = ""
            if failures.get("failures"):
                nxt = max(0.0, float(failures.get("next") or now) - now)
                note = (f"; {failures['failures']} failed attempt(s) of {cfg.listen.study_attempts} "
                        f"({failures.get('error', '?')}), next try in {nxt:.0f} s")
            waiting.append(f"  waiting  {study}  {len(pending)} instance(s){note}")
        rounds = []
        for f in (spool.studies_dir / study).glob("done-*.json"):
            try:
                rounds.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        if rounds:
            last = max(rounds, key=lambda r: r.get("finished") or 0)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("finished") or 0))
            done.append((last.get("finished") or 0,
                         f"  done     {study}  {len(rounds)} round(s), last {when}, results batch "
                         f"{last.get('batch') or 'none (nothing to send)'}"))
    failed = spool.failed_rounds()
    print(f"listener: {'running (pid %d)' % state['pid'] if state else 'not running'}; spool {spool.root}")
    print(f"studies: {len(waiting)} waiting, {1 if scoring else 0} scoring, {len(done)} done, {len(failed)} failed")
    if scoring:
        print(f"  scoring  {scoring}  since {now - float(state.get('since') or now):.0f} s")
    for line in waiting:
        print(line)
    for _, line in sorted(done, reverse=True)[:DONE_LISTED]:
        print(line)
    if len(done) > DONE_LISTED:
        print(f"  ... and {len(done) - DONE_LISTED} more done (oldest not listed)")
    for rec in failed:
        print(f"  failed   {rec.get('study', '?')}  round {rec.get('round', '?')}: {rec.get('reason', '?')}")
    outbox = Outbox(cfg.outbox)
    batches = outbox.pending()
    print(f"outbox {outbox.root}: {len(batches)} batch(es) waiting")
    for dest in cfg.destinations:
        mine = [(b, b.unsent(dest.name)) for b in batches if dest.name in b.destinations]
        mine = [(b, files) for b, files in mine if files]
        print(f"  {dest.label}: {len(mine)} batch(es), {sum(len(f) for _, f in mine)} result(s) not yet "
              f"delivered")
    return 0
