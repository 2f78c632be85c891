"""The ``smsops`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

from smsops import store, warehouse
from smsops.config import REPO_ROOT, paths


def _demo(args: argparse.Namespace) -> int:
    from smsops import demo

    if args.if_empty and not store.is_empty():
        print(f"store {paths().ops_store} already holds contacts; demo not written")
        return 0
    as_of = date.fromisoformat(args.as_of) if args.as_of else None
    print(f"writing a demo base of {args.contacts:,} contacts (seed {args.seed}) …", flush=True)
    try:
        summary = demo.generate(args.contacts, args.seed, as_of=as_of, force=args.force)
    except demo.DemoError as exc:
        print(f"smsops demo: {exc}", file=sys.stderr)
        return 2
    width = max(len(t) for t in summary.counts)
    for table, count in summary.counts.items():
        print(f"  {table:<{width}}  {count:>12,}")
    print(f"wrote {summary.path} in {summary.seconds:.1f} s")
    return 0


def _build(args: argparse.Namespace) -> int:
    if args.refresh and args.full_refresh:
        print("smsops build: --refresh and --full-refresh do not mix", file=sys.stderr)
        return 2
    if args.refresh:
        print("refreshing campaign results (the message-side models) …", flush=True)
    else:
        print("building the warehouse (dbt build) …", flush=True)
    try:
        if args.refresh:
            snap = warehouse.refresh(wait=not args.no_wait, echo=args.verbose)
        else:
            snap = warehouse.build(full_refresh=args.full_refresh, wait=not args.no_wait, echo=args.verbose)
    except warehouse.BuildBusy as exc:
        print(f"smsops build: {exc}", file=sys.stderr)
        return 3
    except warehouse.BuildError as exc:
        print(f"smsops build: {exc}\n{exc.log_tail}", file=sys.stderr)
        return 1
    print(f"published build {snap.build_id} ({snap.path.name}) in {snap.seconds:.1f} s")
    return 0


def _query(args: argparse.Namespace) -> int:
    """A person's SQL on the published warehouse, bounded (``warehouse.user_query``). This process
    runs nothing else, so it also caps its own memory (a string built by one DuckDB function
    escapes DuckDB's memory limit) and exits if a statement ignores the interrupt at its time limit
    (one long string function does)."""
    import resource
    import threading

    try:
        memory = _size(args.memory)
    except ValueError as exc:
        print(f"smsops query: {exc}", file=sys.stderr)
        return 2
    cap = memory + 2**30  # DuckDB's own limit, plus Python, pandas and the rows fetched
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    for lower in (soft, hard):
        if lower != resource.RLIM_INFINITY:
            cap = min(cap, lower)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))

    def overrun() -> None:
        print(f"smsops query: stopped at the time limit ({args.timeout:g} s)", file=sys.stderr, flush=True)
        os._exit(1)

    watchdog = threading.Timer(args.timeout + 5, overrun)
    watchdog.daemon = True
    watchdog.start()
    try:
        result = warehouse.user_query(
            args.sql, limit=args.limit, seconds=args.timeout, memory_limit=args.memory
        )
    except warehouse.WarehouseError as exc:
        print(f"smsops query: {exc}", file=sys.stderr)
        return 1
    finally:
        watchdog.cancel()
    result.frame.to_csv(sys.stdout, index=False)
    if result.truncated:
        print(
            f"smsops query: only the first {result.limit:,} rows are shown: the query returned more"
            " (--limit N shows more)",
            file=sys.stderr,
        )
    return 0


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"give a whole number ≥ 1, not {text!r}")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"give a number of seconds > 0, not {text!r}")
    return seconds


def _size(text: str) -> int:
    """Bytes in a size such as '512MB', '1GB' or '1.5GiB' (as DuckDB reads memory_limit)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--memory {text!r}: give a size such as 512MB or 2GB")
    unit = match.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(float(match.group(1)) * (1024 if "I" in unit else 1000) ** power)


def _segments(args: argparse.Namespace) -> int:
    """What one message costs: encoding, segments, the parts, and the fixes that save segments."""
    from smsops import encoding, pricing

    text = args.text if args.text != "-" else sys.stdin.read().rstrip("\n")
    result = encoding.analyze(text)
    unit = "septets" if result.encoding == encoding.GSM7 else "UTF-16 units"
    p = pricing.price(args.country)
    print(f"encoding   {result.encoding}")
    print(f"length     {result.chars} characters, {result.units} {unit}")
    print(f"segments   {result.segments}  ({result.remaining} {unit} left in the last one)")
    print(f"cost       {pricing.message_cost(result.segments, args.country):.2f} {p.currency} to {p.country}")
    if result.ucs2_chars:
        shown = " ".join(repr(ch) for ch in result.ucs2_chars[:20])
        more = f" and {len(result.ucs2_chars) - 20} more" if len(result.ucs2_chars) > 20 else ""
        print(f"UCS-2 because of  {shown}{more}")
        saved = encoding.savings(text)
        print(f"smart replacement  {saved.smart_segments} segment(s)")
        print(f"transliteration    {saved.transliterated_segments} segment(s)")
    if args.parts and result.segments > 1:
        for number, part in enumerate(result.parts, 1):
            print(f"part {number}: {part!r}")
    return 0


def _import_contacts(args: argparse.Namespace) -> int:
    from smsops import importer

    mapping = {}
    for item in args.map or []:
        column, _, target = item.partition("=")
        mapping[column] = target
    options = importer.Options(
        default_region=args.default_region,
        consent_source=args.consent_source,
        consent_proof=args.consent_proof,
        purpose=args.purpose,
        mapping=mapping or None,
    )
    try:
        fmt = importer.sniff(args.path, options.mapping)
        print("columns:")
        print("\n".join(importer.column_report(fmt)))
        result = importer.run(args.path, options, dry_run=args.dry_run, rejects=args.rejects)
    except importer.ImportFailed as exc:
        print(f"smsops import: {exc}", file=sys.stderr)
        return 2
    print("\n".join(importer.summary_lines(result)))
    if result.rejected_total and args.rejects:
        print(f"rejected rows with their reasons: {args.rejects}")
    elif result.rejected_total:
        print("add --rejects FILE.csv to get every rejected row with its reason")
    return 0


def _contacts_erase(args: argparse.Namespace) -> int:
    """A data-subject request: erase a contact's personal data, keep its consent proof minimised."""
    from smsops import erasure

    request = {
        "phone_e164": args.phone,
        "contact_id": args.contact_id,
        "requested_by": args.requested_by,
        "reason": args.reason,
    }
    conn = store.open_store()
    try:
        if not args.yes:
            preview = erasure.erase(conn, **request, dry_run=True)
            print("\n".join(erasure.summary_lines(preview)))
            if not preview.changed:
                return 0
            if not sys.stdin.isatty():
                print(
                    "smsops contacts erase: not confirmed (no terminal); add --yes to erase", file=sys.stderr
                )
                return 1
            answer = input("Erase for good? This cannot be undone. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing erased")
                return 1
        result = erasure.erase(conn, **request)
    except erasure.ErasureError as exc:
        print(f"smsops contacts erase: {exc}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    print("\n".join(erasure.summary_lines(result)))
    return 0


def _backup(args: argparse.Namespace) -> int:
    """A consistent copy of the operational store and its erasure key, taken while smsops runs."""
    from smsops import backup
    from smsops.i18n import _

    try:
        result = backup.backup(args.dest)
    except (backup.BackupError, OSError) as exc:
        print(f"smsops backup: {exc}", file=sys.stderr)
        return 2
    print(
        _("backed up the operational store ({size} MB, {erasures} erasures in its ledger) to {path}").format(
            size=f"{result.bytes / 1e6:,.1f}", erasures=result.erasures, path=result.path
        )
    )
    if not result.key_included:
        print(
            _("the erasure key comes from $SMSOPS_ERASURE_SECRET: keep that secret with the backup"),
            file=sys.stderr,
        )
    print(_("the warehouse is not backed up: `smsops build` makes it again after a restore"))
    return 0


def _restore(args: argparse.Namespace) -> int:
    """Bring a backup back, then erase again everyone erased since it was taken."""
    from smsops import backup, erasure
    from smsops.i18n import _

    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "smsops restore: "
                + _("not confirmed (no terminal); add --yes to replace the operational store"),
                file=sys.stderr,
            )
            return 1
        answer = input(_("Replace the operational store with the backup? Changes since it are lost. [y/N] "))
        if answer.strip().lower() not in ("y", "yes", "д", "да"):
            print(_("nothing restored"))
            return 1
    try:
        result = backup.restore(args.src)
    except (backup.BackupError, erasure.ErasureError, OSError) as exc:
        print(f"smsops restore: {exc}", file=sys.stderr)
        return 2
    print(_("restored the operational store as it was at {time} UTC").format(time=result.taken_at))
    print(
        _("{n} erasure(s) made since replayed ({contacts} contact(s) erased again)").format(
            n=result.erasures_replayed, contacts=result.contacts_erased
        )
    )
    print(_("{n} consent event(s) recorded since carried over").format(n=result.consent_events_carried))
    if result.purged is not None:
        print("\n".join(erasure.purged_lines(result.purged)))
    print(_("run `smsops build`: the warehouse is built anew from the restored store"))
    return 0


def _warn_if_exposed(command: str, address: str, port: int) -> None:
    """Say on stderr and in the log who can reach an app without sign-in on ``address``."""
    import logging
    from datetime import UTC, datetime

    from smsops import config
    from smsops.i18n import _

    if config.is_loopback(address) or config.sign_in_configured():
        return
    if command == "run":
        text = _(
            "WARNING: the app listens on {address}, reachable from other machines, and smsops has no"
            " sign-in yet (issue 19): anyone who can open http://{address}:{port} can launch paid sends"
            " to the whole base, reveal and export phone numbers, change consent and erase contacts."
            " Bind it to 127.0.0.1 and put a reverse proxy with TLS and access control in front."
        )
    else:
        text = _(
            "WARNING: smsops serve listens on {address}:{port}, reachable from other machines."
            " Providers' webhooks are checked by their signatures, but smsops has no sign-in yet (issue 19): keep the app"
            " itself (`smsops run`) on 127.0.0.1, or anyone who can open it can launch sends and read"
            " phone numbers. Expose only /webhooks/ and /l/ through a reverse proxy with TLS."
        )
    text = text.format(address=address, port=port)
    if command == "serve":  # its log goes to stderr (and to serve.log when `smsops run` started it)
        logging.getLogger("smsops.cli").warning("%s", text)
        return
    print(text, file=sys.stderr, flush=True)
    log = config.paths().home / "serve.log"  # the log of the services `smsops run` starts beside it
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} WARNING smsops.cli: {text}\n")


def _status(args: argparse.Namespace) -> int:
    p = paths()
    print(f"home       {p.home}")
    if p.ops_store.exists():
        conn = store.connect(p.ops_store)
        try:
            store.create_schema(conn)
            for table, count in store.table_counts(conn).items():
                print(f"  {table:<22} {count:>12,}")
        finally:
            conn.close()
    else:
        print("  no operational store yet (run `smsops demo` or import your contacts)")
    snap = warehouse.current()
    if snap is None:
        print("warehouse  not built yet (run `smsops build`)")
    else:
        print(
            f"warehouse  build {snap.build_id}, built {snap.built_at:%Y-%m-%d %H:%M:%S} UTC in {snap.seconds:.1f} s"
        )
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.tenth = -1

    def __call__(self, p) -> None:
        if self.first_done is None:
            self.first_done = p.done
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = (p.done - self.first_done) / elapsed
        width = 30
        filled = int(width * p.fraction)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {p.fraction:6.1%}  {p.done:,}/{p.total:,}"
            f"  submitted {p.submitted:,}  {speed:,.0f}/s"
        )
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif int(p.fraction * 10) != self.tenth:
            self.tenth = int(p.fraction * 10)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in counts.items()) or "none"


def _campaign_send(args: argparse.Namespace) -> int:
    """Send one running campaign's due messages in the foreground, with a progress bar."""
    import asyncio
    import contextlib
    import dataclasses
    import signal

    from smsops import dispatch, serve
    from smsops import unsettled as unsettled_counts
    from smsops.campaigns import CampaignNotFound
    from smsops.providers import ProviderError

    try:
        provider = serve.load_provider(args.provider)
        settings = dispatch.DispatchSettings(
            rate_per_second=args.rate,
            concurrency=args.concurrency or dispatch.concurrency_for(args.rate),
            clients=args.concurrency or dispatch.concurrency_for(args.rate),
            processes=args.processes or dispatch.processes_for(args.rate),
        )
    except (ProviderError, dispatch.DispatchError) as exc:
        print(f"smsops campaign send: {exc}", file=sys.stderr)
        return 2
    webhook_url = (
        args.webhook_url
        or os.environ.get("SMSOPS_WEBHOOK_URL")
        or f"http://127.0.0.1:{serve.DEFAULT_WEBHOOK_PORT}"
    )
    with contextlib.ExitStack() as stack:
        if provider.is_sandbox and not serve.sandbox_reachable(provider):
            sandbox = stack.enter_context(serve.start_sandbox(provider, None, rate_per_second=args.rate))
            print(f"no sandbox was running: started one at {sandbox.url} for this run", file=sys.stderr)
        if serve.webhook_reachable(webhook_url):
            callback = f"{webhook_url.rstrip('/')}/webhooks/{provider.name}/status"
            settings = dataclasses.replace(settings, status_callback_url=callback)
        else:
            print(
                f"no webhook app at {webhook_url}: delivery receipts will not be recorded"
                " (start `smsops serve` to collect them)",
                file=sys.stderr,
            )
        bar = _ProgressBar()

        async def send() -> dispatch.DispatchReport:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            return await dispatch.run(None, provider, settings, campaign_id=args.id, stop=stop, progress=bar)

        try:
            report = dispatch.run_loop(send())
        except CampaignNotFound as exc:
            print(f"smsops campaign send: {exc}", file=sys.stderr)
            return 2
        finally:
            bar.close()
    if report.error and report.requests == 0 and report.stopped not in ("done", "stopped"):
        print(f"smsops campaign send: {report.error}", file=sys.stderr)
        return 3 if report.stopped == "credentials" else 2
    p = dispatch.progress(args.id)
    rejected = {
        k: n
        for k, n in p.reasons.items()
        if k in ("provider_rejected", "provider_opted_out", "gave_up_after_retries")
    }
    suppressed = {
        k: v for k, v in p.reasons.items() if k not in rejected and k not in ("fate_unknown", "cancelled")
    }
    print(
        f"campaign {args.id}: {report.stopped} after {report.seconds:.1f} s, {report.requests:,} requests ({report.rate:,.0f}/s)"
    )
    print(f"  submitted   {p.submitted:,} of {p.total:,}")
    print(
        f"  rejected    {p.states.get('rejected', 0):,}: {_counts(rejected)}; codes {_counts(p.error_codes)}"
    )
    print(
        f"  not sent    {p.states.get('suppressed', 0) + p.states.get('holdout', 0):,}: {_counts(suppressed)}"
    )
    unsettled = unsettled_counts.count(args.id)
    print(
        f"  unknown     {p.states.get('unknown', 0):,} ({unsettled.awaiting_lookup:,} awaiting a lookup at the"
        f" provider, {unsettled.needs_a_person:,} need a person: `smsops campaign settle {args.id}`)"
    )
    print(f"  deferred    {p.waiting:,} planned, not due yet (quiet hours, retries, an A/B remainder)")
    if p.states.get("cancelled"):
        print(f"  cancelled   {p.states['cancelled']:,}")
    print(f"  status      {p.status}")
    if report.error:
        print(f"smsops campaign send: {report.error}", file=sys.stderr)
        return 3 if report.stopped == "credentials" else 1
    open_rows = p.states.get("sending", 0) + unsettled.total
    if p.status == "running" and open_rows:
        print(
            f"smsops campaign send: campaign {args.id} is not finished: {p.states.get('sending', 0):,} still"
            f" sending, {unsettled.awaiting_lookup:,} with an unknown outcome awaiting a lookup,"
            f" {unsettled.needs_a_person:,} with an unknown outcome that a person must settle",
            file=sys.stderr,
        )
        return 4
    return 0


def _campaign_settle(args: argparse.Namespace) -> int:
    """Settle a campaign's messages of unknown outcome: send them again, or close them unsent."""
    from smsops import unsettled

    before = unsettled.count(args.id)
    if not before.needs_a_person:
        print(
            f"campaign {args.id}: no message needs a decision"
            + (
                f" ({before.awaiting_lookup:,} await a lookup at the provider)"
                if before.awaiting_lookup
                else ""
            )
        )
        return 0
    if args.decision is None:
        print(
            f"campaign {args.id}: {before.needs_a_person:,} messages have an unknown outcome: they may have"
            " reached their recipients. Choose --retry (send again: some may get a second copy) or --give-up.",
            file=sys.stderr,
        )
        return 2
    try:
        changed = unsettled.decide(args.id, args.decision, by=args.by)
    except ValueError as exc:
        print(f"smsops campaign settle: {exc}", file=sys.stderr)
        return 2
    verb = "planned again" if args.decision == "retry" else "closed unsent"
    print(f"campaign {args.id}: {changed:,} messages {verb} (recorded as decided by {args.by})")
    return 0


def _receipts_reconcile(args: argparse.Namespace) -> int:
    """Look up, at the provider, the messages whose delivery receipt is overdue (one pass)."""
    from smsops import receipts, serve
    from smsops.providers import ProviderError

    if args.limit < 1:
        print(f"smsops receipts reconcile: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    try:  # a ConfigError too: an unknown provider, a bad SMSOPS_*RECEIPT_LOOKUP_MINUTES
        provider = serve.load_provider(args.provider)
        report = receipts.reconcile_receipts_sync(provider, limit=args.limit)
    except ProviderError as exc:
        print(f"smsops receipts reconcile: {exc}", file=sys.stderr)
        return 2
    horizon = receipts.HORIZON.total_seconds() / 3600
    print(f"{provider.name}: {report.looked_up:,} message(s) with an overdue receipt looked up")
    print(f"  recovered      {report.recovered:,} (final status recorded)")
    print(f"  still pending  {report.still_pending:,} (status recorded; asked again later)")
    print(f"  not found      {report.not_found:,} (the provider does not know them; asked again later)")
    print(f"  errors         {report.errors:,} (the provider could not answer; asked again next time)")
    print(
        f"  given up       {report.past_horizon:,} (no final status {horizon:.0f} h after sending,"
        f" in the last {horizon:.0f} h: left awaiting receipt)"
    )
    if report.error:
        print(f"smsops receipts reconcile: {report.error}", file=sys.stderr)
        return 3 if report.stopped == "credentials" else 1
    return 1 if report.errors else 0


def _campaign_schedule(args: argparse.Namespace) -> int:
    """Schedule a draft: the time is read in the team's zone and stored in UTC."""
    from datetime import datetime

    from smsops import campaigns, config

    zone = config.time_zone()
    try:
        moment = datetime.strptime(args.at.strip(), "%Y-%m-%d %H:%M")
    except ValueError:
        print(f"smsops campaign schedule: --at {args.at!r}: expected 'YYYY-MM-DD HH:MM'", file=sys.stderr)
        return 2
    try:
        at = campaigns.local_time(moment.date(), moment.time(), zone)
        scheduled = campaigns.schedule(args.id, at)
    except (campaigns.CampaignError, campaigns.CampaignNotFound) as exc:
        print(f"smsops campaign schedule: {exc}", file=sys.stderr)
        return 2
    print(f"campaign {scheduled.campaign_id} starts {moment:%Y-%m-%d %H:%M} {zone} ({at:%Y-%m-%d %H:%M} UTC)")
    return 0


def _campaign_start_due(args: argparse.Namespace) -> int:
    from smsops import campaigns

    started = campaigns.start_due()
    for cid, result in started.items():
        if isinstance(result, str):
            print(f"campaign {cid}: could not start: {result}", file=sys.stderr)
        else:
            print(f"campaign {cid}: started, {result.to_send:,} messages planned")
    if not started:
        print("no scheduled campaign is due")
    return 1 if any(isinstance(r, str) for r in started.values()) else 0


def _campaign_test_send(args: argparse.Namespace) -> int:
    from smsops import campaigns, config

    numbers = args.to if args.to is not None else ",".join(config.seed_numbers())
    try:
        sent = campaigns.test_send(args.id, numbers)
    except (campaigns.CampaignError, campaigns.CampaignNotFound, warehouse.WarehouseError) as exc:
        print(f"smsops campaign test-send: {exc}", file=sys.stderr)
        return 2
    print(
        f"test send {sent.test_campaign_id}: {sent.messages} message(s) to {len(sent.numbers)} number(s),"
        f" personalised for contact {sent.sample_contact_id} ({sent.sample_phone});"
        " smsops serve sends them"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Webhooks, the sandbox and the dispatcher in one process, until Ctrl-C."""
    import logging

    from smsops import dispatch, serve
    from smsops.providers import ProviderError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns what matters
    _warn_if_exposed("serve", args.host, args.port)
    try:
        settings = serve.ServeSettings(
            host=args.host,
            port=args.port,
            provider=args.provider,
            public_url=args.public_url,
            dispatch=dispatch.DispatchSettings(
                rate_per_second=args.rate,
                concurrency=args.concurrency or dispatch.concurrency_for(args.rate),
                clients=args.concurrency or dispatch.concurrency_for(args.rate),
                processes=args.processes or dispatch.processes_for(args.rate),
            ),
        )

        def ready(services: serve.Services) -> None:
            print("smsops serve (Ctrl-C to stop)")
            print("\n".join(serve.describe(services)), flush=True)

        dispatch.run_loop(serve.run(None, settings, ready=ready))
    except (ProviderError, dispatch.DispatchError, RuntimeError) as exc:
        print(f"smsops serve: {exc}", file=sys.stderr)
        return 2
    print("stopped")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Set up everything a first-time user needs, then start the app (replaces this process)."""
    if store.is_empty():
        rc = _demo(
            argparse.Namespace(contacts=args.demo_contacts, seed=42, as_of=None, force=False, if_empty=True)
        )
        if rc:
            return rc
    if not args.skip_build or warehouse.current() is None:
        rc = _build(argparse.Namespace(full_refresh=False, refresh=False, no_wait=False, verbose=False))
        if rc:
            return rc
    _warn_if_exposed("run", args.address, args.port)
    if not args.no_serve:
        _start_serve_beside_the_app()
    url = f"http://{args.address}:{args.port}"
    print(f"smsops is starting on {url}", flush=True)
    os.execv(sys.executable, streamlit_argv(args.address, args.port))
    return 0  # not reached


def _start_serve_beside_the_app() -> None:
    """`smsops serve` (webhooks, sandbox, dispatcher) as a child that ends with the app: the
    kernel stops it when this process (Streamlit, after exec) exits."""
    import ctypes
    import signal
    import subprocess

    def die_with_parent() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    log = paths().home / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "smsops.cli", "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    print(f"webhooks, sandbox and dispatcher are starting (log: {log})", flush=True)


# Streamlit treats a `pages/` folder beside the entry script as "multipage v1" until the
# entry script has called st.navigation once in the server's life: a first visit straight
# to /contacts would then run that page alone, without app.py's navigation. Telling
# Streamlit up front that the app does not use the pages folder avoids that. The child
# process imports Streamlit; smsops itself never does.
_LAUNCH = (
    "import sys\n"
    "from streamlit.runtime.pages_manager import PagesManager\n"
    "PagesManager.uses_pages_directory = False\n"
    "from streamlit.web.cli import main\n"
    "sys.argv = ['streamlit', 'run', *sys.argv[1:]]\n"
    "sys.exit(main())\n"
)


def streamlit_argv(address: str, port: int, *extra: str) -> list[str]:
    """The command that serves the app (app.py and its pages) on ``address:port``."""
    return [
        sys.executable, "-c", _LAUNCH, str(REPO_ROOT / "app.py"),
        "--server.address", address, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", *extra,
    ]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    from smsops.i18n import _

    ap = argparse.ArgumentParser(prog="smsops", description="Self-hosted SMS campaigns over a dbt warehouse.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write a realistic demo base into the operational store")
    d.add_argument("--contacts", type=int, default=20_000, help="number of contacts (default 20,000)")
    d.add_argument("--seed", type=int, default=42, help="random seed: same seed and --as-of, same data")
    d.add_argument("--as-of", help="the demo's 'today' as YYYY-MM-DD (default: today, UTC)")
    d.add_argument("--force", action="store_true", help="replace a store that already holds contacts")
    d.add_argument("--if-empty", action="store_true", help="do nothing when the store already holds contacts")
    d.set_defaults(func=_demo)

    b = sub.add_parser("build", help="run dbt build and publish the warehouse snapshot the app reads")
    b.add_argument("--full-refresh", action="store_true", help="rebuild incremental models from scratch")
    b.add_argument(
        "--refresh", action="store_true",
        help="only the campaign results (message-side models, no data tests): quick, after a send",
    )  # fmt: skip
    b.add_argument("--no-wait", action="store_true", help="fail instead of waiting when a build is running")
    b.add_argument("-v", "--verbose", action="store_true", help="show dbt's output")
    b.set_defaults(func=_build)

    q = sub.add_parser(
        "query",
        help="run one read-only SQL query against the published warehouse; prints CSV",
        description="Reads the published warehouse and nothing else (no files, extensions or other"
        " databases); one SELECT (or WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), bounded in rows,"
        " time and memory.",
    )
    q.add_argument("sql")
    q.add_argument(
        "--limit", type=_positive_int, default=warehouse.USER_ROW_LIMIT,
        help=f"rows printed at most (default {warehouse.USER_ROW_LIMIT:,}); a note on standard error says when more were left out",
    )  # fmt: skip
    q.add_argument(
        "--timeout", type=_positive_seconds, default=warehouse.USER_SECONDS,
        help=f"seconds the query may run (default {warehouse.USER_SECONDS:g})",
    )  # fmt: skip
    q.add_argument(
        "--memory", default=warehouse.USER_MEMORY_LIMIT,
        help=f"DuckDB's memory limit for the query (default {warehouse.USER_MEMORY_LIMIT})",
    )  # fmt: skip
    q.set_defaults(func=_query)

    g = sub.add_parser("segments", help="count a message's SMS segments, encoding and cost")
    g.add_argument("text", help="the message text ('-' reads it from standard input)")
    g.add_argument("--country", default="RU", help="destination country for the price (default RU)")
    g.add_argument("--parts", action="store_true", help="print each segment's text")
    g.set_defaults(func=_segments)

    imp = sub.add_parser("import", help="import data into the operational store")
    imp_sub = imp.add_subparsers(dest="what", required=True)
    ic = imp_sub.add_parser(
        "contacts", help="contacts from a CSV export (UTF-8 or Windows-1251, any delimiter)"
    )
    ic.add_argument("path")
    ic.add_argument(
        "--default-region", default="RU", help="country for numbers written without a country code"
    )
    ic.add_argument(
        "--consent-source", help="the basis for marketing consent (without it: no marketing consent)"
    )
    ic.add_argument("--consent-proof", help="where the proof of consent is kept (URL, document id)")
    ic.add_argument("--purpose", choices=["marketing", "service"], default="marketing")
    ic.add_argument("--map", action="append", metavar="COLUMN=FIELD", help="correct a column's mapping")
    ic.add_argument("--dry-run", action="store_true", help="report what would happen, write nothing")
    ic.add_argument("--rejects", metavar="OUT.csv", help="write every rejected row with its reason")
    ic.set_defaults(func=_import_contacts)

    ct = sub.add_parser("contacts", help="manage contacts: data-subject requests")
    ct_sub = ct.add_subparsers(dest="action", required=True)
    ce = ct_sub.add_parser(
        "erase", help="erase a contact's personal data; its consent proof is kept in minimal form"
    )
    target = ce.add_mutually_exclusive_group(required=True)
    target.add_argument("--phone", help="every contact holding this number (any form, e.g. 8 912 345-67-89)")
    target.add_argument("--contact-id", type=int, help="one contact by its id")
    ce.add_argument("--requested-by", required=True, metavar="NAME", help="who asked (a person or a ticket)")
    ce.add_argument("--reason", help="why, for the ledger (no personal data)")
    ce.add_argument("--yes", action="store_true", help="erase without asking for confirmation")
    ce.set_defaults(func=_contacts_erase)

    bk = sub.add_parser(
        "backup", help="copy the operational store and its erasure key to a new folder, while smsops runs"
    )
    bk.add_argument("dest", help="a new or empty folder, outside SMSOPS_HOME")
    bk.set_defaults(func=_backup)
    rs = sub.add_parser(
        "restore", help="bring a backup back, then erase again everyone erased since it was taken"
    )
    rs.add_argument("src", help="the folder `smsops backup` wrote")
    rs.add_argument("--yes", action="store_true", help="replace the store without asking for confirmation")
    rs.set_defaults(func=_restore)

    s = sub.add_parser("status", help="show the store's row counts and the published warehouse build")
    s.set_defaults(func=_status)

    cp = sub.add_parser("campaign", help="send, schedule or test-send a campaign")
    cp_sub = cp.add_subparsers(dest="action", required=True)
    cs = cp_sub.add_parser("send", help="send a running campaign's due messages now, with a progress bar")
    cs.add_argument("id", type=int, help="the campaign's id")
    cs.add_argument("--rate", type=float, default=100.0, help="messages per second at most (default 100)")
    cs.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=_("requests in flight at most (default: the rate × 0.15 s, at least 32)"),
    )
    cs.add_argument("--processes", type=int,
                    help="dispatcher processes, a core each (default: one per 2,500 msg/s of --rate, at most the cores)")  # fmt: skip
    cs.add_argument("--provider", help="sandbox, twilio or smsru (default: $SMSOPS_PROVIDER, else sandbox)")
    cs.add_argument("--webhook-url", help="the webhook app receipts go to (default http://127.0.0.1:8600)")
    cs.set_defaults(func=_campaign_send)
    csc = cp_sub.add_parser(
        "schedule", help="start a draft campaign by itself at a time (smsops serve starts it)"
    )
    csc.add_argument("id", type=int, help="the campaign's id")
    csc.add_argument("--at", required=True, metavar="'YYYY-MM-DD HH:MM'",
                     help="when, in $SMSOPS_TIME_ZONE (default Europe/Moscow)")  # fmt: skip
    csc.set_defaults(func=_campaign_schedule)
    cdue = cp_sub.add_parser("start-due", help="start the scheduled campaigns whose time has come, now")
    cdue.set_defaults(func=_campaign_start_due)
    cu = cp_sub.add_parser(
        "settle", help="decide about messages whose outcome is unknown: send again or give up"
    )
    cu.add_argument("id", type=int, help="the campaign id")
    decision = cu.add_mutually_exclusive_group()
    decision.add_argument("--retry", dest="decision", action="store_const", const="retry")
    decision.add_argument("--give-up", dest="decision", action="store_const", const="give_up")
    cu.add_argument("--by", default=os.environ.get("USER", "cli"), help="who decides (recorded)")
    cu.set_defaults(func=_campaign_settle, decision=None)
    ct = cp_sub.add_parser("test-send", help="send each variant to the team's own numbers, counted nowhere")
    ct.add_argument("id", type=int, help="the campaign's id")
    ct.add_argument("--to", help="seed numbers, comma-separated (default $SMSOPS_SEED_NUMBERS)")
    ct.set_defaults(func=_campaign_test_send)

    rc = sub.add_parser("receipts", help="delivery receipts that never came: ask the provider")
    rc_sub = rc.add_subparsers(dest="action", required=True)
    rr = rc_sub.add_parser(
        "reconcile", help="look up the messages whose receipt is overdue and record their status"
    )
    rr.add_argument("--provider", help="sandbox, twilio or smsru (default: $SMSOPS_PROVIDER, else sandbox)")
    rr.add_argument("--limit", type=int, default=500, help="messages looked up at most (default 500)")
    rr.set_defaults(func=_receipts_reconcile)

    sv = sub.add_parser("serve", help="webhooks, the sandbox and the dispatcher in one process")
    sv.add_argument("--host", default="127.0.0.1", help="address of the webhook app (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8600, help="port of the webhook app (default 8600)")
    sv.add_argument("--provider", help="sandbox, twilio or smsru (default: $SMSOPS_PROVIDER, else sandbox)")
    sv.add_argument("--public-url", help="the address providers reach the webhook app at, behind a proxy")
    sv.add_argument("--rate", type=float, default=100.0, help="messages per second at most (default 100)")
    sv.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=_("requests in flight at most (default: the rate × 0.15 s, at least 32)"),
    )
    sv.add_argument("--processes", type=int,
                    help="dispatcher processes, a core each (default: one per 2,500 msg/s of --rate, at most the cores)")  # fmt: skip
    sv.set_defaults(func=_serve)

    r = sub.add_parser("run", help="demo data if the store is empty, build if needed, start the app")
    r.add_argument("--address", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8501)
    r.add_argument("--demo-contacts", type=int, default=50_000)
    r.add_argument("--skip-build", action="store_true", help="serve the last published build as it is")
    r.add_argument("--no-serve", action="store_true", help="the app only: no webhooks, sandbox or dispatcher")
    r.set_defaults(func=_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    from smsops import config

    args = parser().parse_args(argv)
    # what this process (and the app, dbt and the workers it starts) creates is its owner's only
    before = os.umask(config.PRIVATE_UMASK)
    try:
        if config.paths().home.exists():  # made by the command when it needs it, 0700 by the umask
            config.secure_home()
        return args.func(args)
    finally:
        os.umask(before)


if __name__ == "__main__":
    raise SystemExit(main())
